# One training per seed under torchrun, in its job's folder (results/stages/train/<key>/). Resume
# checkpoints live in ckpt/ there, which is not a declared output: Snakemake deletes a failed job's
# outputs, and a resumed job must find its checkpoint.


rule train:
    input:
        unpack(keyed_inputs("train")),
    output:
        **keyed_outputs("train"),
    params:
        **keyed_params("train"),
        out_dir=lambda wildcards: PLAN.job("train", wildcards.key).dir,
        ckpt_dir=lambda wildcards: PLAN.job("train", wildcards.key).dir + "/ckpt",
    threads: threads_of("train")
    resources:
        nproc=nproc("train"),
        gpu=gpus("train"),
        **slurm("train"),
    group: group_of("train")
    log:
        keyed_file("train", "train.log"),
    benchmark:
        keyed_file("train", "benchmark.tsv")
    shell:
        TORCHRUN + " train --data {input.data:q} --vocab-size {params.vocab:q} --model-cfg {params.model:q} "
        "--cfg {params.cfg:q} --seed {params.seed:q} --device {params.device:q} --precision {params.precision:q} "
        "--out-dir {params.out_dir:q} --ckpt-dir {params.ckpt_dir:q} --loader-cfg {params.loader:q} "
        "--shard-order={input.order:q} > {log:q} 2>&1"
