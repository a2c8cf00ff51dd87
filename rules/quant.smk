# EMA weights -> Hessians (calibrate) -> quantized tensors -> compressed artifact; size.json counts
# code plus model bytes. Hessians are their own file, so a change of clip or bits reruns quantize only.
# One thread each (Snakemake's default): GPTQ is a loop of small column updates that more OpenMP
# threads only slow down on a busy CPU, and seeds then quantize side by side.


rule calibrate:
    input:
        ema=f"{SEED_DIR}/ema.pgt",
        data=DATASET_DIR if config["calibrate"]["source"] == "train" else [],
    output:
        f"{SEED_DIR}/hessians.pgt",
    params:
        cfg=section("calibrate"),
        # a flag and its path, or nothing: a list, so that :q quotes each element
        data=["--data", DATASET_DIR] if config["calibrate"]["source"] == "train" else [],
        device=config["device"],
        precision=config["precision"],
        code=code("calibrate"),
    resources:
        gpu=gpus("calibrate"),
        **slurm("calibrate"),
    group: group_of("calibrate")
    log:
        f"{RUN}/logs/calibrate_seed{{seed}}.log",
    benchmark:
        f"{RUN}/benchmarks/calibrate_seed{{seed}}.tsv"
    shell:
        "pgolf calibrate --weights {input.ema:q} {params.data:q} --cfg {params.cfg:q} --seed {wildcards.seed:q} "
        "--device {params.device:q} --precision {params.precision:q} --out {output:q} > {log:q} 2>&1"


# Only GPTQ reads Hessians: round-to-nearest runs without the calibrate stage.
GPTQ = config["quant"]["method"] == "gptq"


rule quantize:
    input:
        ema=f"{SEED_DIR}/ema.pgt",
        hessians=f"{SEED_DIR}/hessians.pgt" if GPTQ else [],
    output:
        f"{SEED_DIR}/quant.pgt",
    params:
        cfg=section("quant"),
        hessians=["--hessians", f"{SEED_DIR}/hessians.pgt"] if GPTQ else [],
        code=code("quantize"),
    resources:
        **slurm("quantize"),
    group: group_of("quantize")
    log:
        f"{RUN}/logs/quantize_seed{{seed}}.log",
    benchmark:
        f"{RUN}/benchmarks/quantize_seed{{seed}}.tsv"
    shell:
        "pgolf quantize --weights {input.ema:q} {params.hessians:q} --cfg {params.cfg:q} --out {output:q} > {log:q} 2>&1"


# With pruning on, compress aims at the budget minus a fixed code reserve (so a code edit reruns only
# the size check), and with GPTQ it weights each code's error by the Hessians.
PRUNE = config["compress"]["prune"]
PRUNE_HESSIANS = PRUNE and GPTQ


rule compress:
    input:
        quant=f"{SEED_DIR}/quant.pgt",
        hessians=f"{SEED_DIR}/hessians.pgt" if PRUNE_HESSIANS else [],
    output:
        f"{SEED_DIR}/artifact.pgz",
    params:
        # without pruning compress reads no budget (size checks it): a new budget reruns size alone
        cfg=section("compress", without=() if PRUNE else ("budget_bytes", "code_reserve")),
        # a flag and its path, or nothing: a list, so that :q quotes each element
        hessians=["--hessians", f"{SEED_DIR}/hessians.pgt"] if PRUNE_HESSIANS else [],
        code=code("compress"),
    resources:
        **slurm("compress"),
    group: group_of("compress")
    log:
        f"{RUN}/logs/compress_seed{{seed}}.log",
    benchmark:
        f"{RUN}/benchmarks/compress_seed{{seed}}.tsv"
    shell:
        "pgolf compress --quant {input.quant:q} --cfg {params.cfg:q} {params.hessians:q} --out {output:q} "
        "> {log:q} 2>&1"


# Its own rule so that editing code reruns only this check, not compression and evaluation.
rule size:
    localrule: is_local("size")
    input:
        artifact=f"{SEED_DIR}/artifact.pgz",
    output:
        f"{SEED_DIR}/size.json",
    params:
        cfg=section("compress"),
        code_bytes=pgolf.pipeline.bundle.code_bytes(),
        code=code("size"),
    log:
        f"{RUN}/logs/size_seed{{seed}}.log",
    shell:
        "pgolf size --artifact {input.artifact:q} --cfg {params.cfg:q} --out {output:q} > {log:q} 2>&1"
