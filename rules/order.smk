# Shard difficulty for loader mode `ordered`: a probe model (a named checkpoint, or a short
# training run of this config, cached on its own) scores every train shard; train reads the order.
# pgolf/pipeline/plan.py gives each job its probe's schedule and inputs.

for _run in PLAN.runs.values():  # a named probe checkpoint is an input: Snakemake must be able to read its path
    config_path("order.probe_checkpoint", _run.cfg["order"]["probe_checkpoint"])


rule probe_train:
    input:
        unpack(keyed_inputs("probe_train")),
    output:
        **keyed_outputs("probe_train"),
    params:
        **keyed_params("probe_train"),
        out_dir=lambda wildcards: PLAN.job("probe_train", wildcards.key).dir,
        ckpt_dir=lambda wildcards: PLAN.job("probe_train", wildcards.key).dir + "/ckpt",
    threads: threads_of("probe_train")
    resources:
        nproc=nproc("probe_train"),
        gpu=gpus("probe_train"),
        **slurm("probe_train"),
    log:
        keyed_file("probe_train", "probe_train.log"),
    shell:
        TORCHRUN + " train --data {input.data:q} --vocab-size {params.vocab:q} --model-cfg {params.model:q} "
        "--cfg {params.cfg:q} --seed 0 --device {params.device:q} --precision {params.precision:q} "
        "--out-dir {params.out_dir:q} --ckpt-dir {params.ckpt_dir:q} --loader-cfg {params.loader:q} > {log:q} 2>&1"


rule shard_order:
    input:
        unpack(keyed_inputs("shard_order")),
    output:
        **keyed_outputs("shard_order"),
    params:
        **keyed_params("shard_order"),
    resources:
        **slurm("shard_order"),
    log:
        keyed_file("shard_order", "shard_order.log"),
    shell:
        "pgolf shard-order --data {input.data:q} --probe {input.probe:q} --cfg {params.cfg:q} --vocab-size {params.vocab:q} "
        "--out {output.order:q} > {log:q} 2>&1"
