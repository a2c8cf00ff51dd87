# Shard difficulty for loader mode `ordered`: a probe model (a named checkpoint, or a short
# training run of this config, cached on its own) scores every train shard; train reads the order.

PROBE_DIR = f"{RUN}/probe"
SHARD_ORDER = f"{RUN}/shard_order.json"


def probe_weights(wildcards=None):
    return config_path("order.probe_checkpoint", config["order"]["probe_checkpoint"]) or f"{PROBE_DIR}/ema.pgt"


def shard_order_input(wildcards):
    """shard_order.json when training reads the shards hardest or easiest first, else nothing."""
    loader = config["loader"]
    return [SHARD_ORDER] if loader["mode"] == "ordered" and loader["order"] != "given" else []


rule probe_train:
    input:
        data=DATASET_DIR,
    output:
        ema=f"{PROBE_DIR}/ema.pgt",
        raw=f"{PROBE_DIR}/raw.pgt",
        metrics=f"{PROBE_DIR}/metrics.parquet",
        summary=f"{PROBE_DIR}/train.json",
    params:
        model=section("model"),
        cfg=json.dumps({**config["train"], "iterations": config["order"]["probe_iterations"],
                        "warmdown_steps": min(config["train"]["warmdown_steps"], config["order"]["probe_iterations"]),
                        "max_wallclock_seconds": 0, "swa": False, "qat_below": 0}, sort_keys=True),
        # shuffled windows from every shard: a probe that read the shards in order would find the
        # ones it trained on easy
        loader=json.dumps({"mode": "shuffled"}),
        vocab=VOCAB,
        device=config["device"],
        precision=config["precision"],
        out_dir=PROBE_DIR,
        ckpt_dir=f"{PROBE_DIR}/ckpt",
        code=code("probe_train"),
    threads: threads_of("probe_train")
    resources:
        nproc=NPROC,
        gpu=gpus("probe_train"),
        **slurm("probe_train"),
    log:
        f"{RUN}/logs/probe_train.log",
    shell:
        TORCHRUN + " train --data {input.data:q} --vocab-size {params.vocab:q} --model-cfg {params.model:q} "
        "--cfg {params.cfg:q} --seed 0 --device {params.device:q} --precision {params.precision:q} "
        "--out-dir {params.out_dir:q} --ckpt-dir {params.ckpt_dir:q} --loader-cfg {params.loader:q} > {log:q} 2>&1"


rule shard_order:
    input:
        data=DATASET_DIR,
        probe=probe_weights(),
    output:
        SHARD_ORDER,
    params:
        # the probe's keys reach this stage through the probe's weights, its input
        cfg=section("order", without=("probe_checkpoint", "probe_iterations")),
        vocab=VOCAB,
        code=code("shard_order"),
    resources:
        **slurm("shard_order"),
    log:
        f"{RUN}/logs/shard_order.log",
    shell:
        "pgolf shard-order --data {input.data:q} --probe {input.probe:q} --cfg {params.cfg:q} --vocab-size {params.vocab:q} "
        "--out {output:q} > {log:q} 2>&1"
