# One training per seed under torchrun. Resume checkpoints live in ckpt/, which is not a declared
# output: Snakemake deletes a failed job's outputs, and a resumed job must find its checkpoint.


rule train:
    input:
        data=DATASET_DIR,
        order=shard_order_input,
    output:
        ema=f"{SEED_DIR}/ema.pgt",
        raw=f"{SEED_DIR}/raw.pgt",
        metrics=f"{SEED_DIR}/metrics.parquet",
        summary=f"{SEED_DIR}/train.json",
    params:
        model=section("model"),
        cfg=section("train"),
        loader=section("loader"),
        vocab=VOCAB,
        device=config["device"],
        precision=config["precision"],
        out_dir=SEED_DIR,
        ckpt_dir=f"{SEED_DIR}/ckpt",
        code=code("train"),
    threads: threads_of("train")
    resources:
        nproc=NPROC,
        gpu=gpus("train"),
        **slurm("train"),
    group: group_of("train")
    log:
        f"{RUN}/logs/train_seed{{seed}}.log",
    benchmark:
        f"{RUN}/benchmarks/train_seed{{seed}}.tsv"
    shell:
        TORCHRUN + " train --data {input.data:q} --vocab-size {params.vocab:q} --model-cfg {params.model:q} "
        "--cfg {params.cfg:q} --seed {wildcards.seed:q} --device {params.device:q} --precision {params.precision:q} "
        "--out-dir {params.out_dir:q} --ckpt-dir {params.ckpt_dir:q} --loader-cfg {params.loader:q} "
        "--shard-order={input.order:q} > {log:q} 2>&1"
