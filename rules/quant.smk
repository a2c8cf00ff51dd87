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
        code=code("calibrate"),
    log:
        f"{RUN}/logs/calibrate_seed{{seed}}.log",
    benchmark:
        f"{RUN}/benchmarks/calibrate_seed{{seed}}.tsv"
    shell:
        "pgolf calibrate --weights {input.ema:q} {params.data:q} --cfg {params.cfg:q} --seed {wildcards.seed:q} "
        "--device {params.device:q} --out {output:q} > {log:q} 2>&1"


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
    log:
        f"{RUN}/logs/quantize_seed{{seed}}.log",
    benchmark:
        f"{RUN}/benchmarks/quantize_seed{{seed}}.tsv"
    shell:
        "pgolf quantize --weights {input.ema:q} {params.hessians:q} --cfg {params.cfg:q} --out {output:q} > {log:q} 2>&1"


# With pruning on, compress aims at the budget minus the code bytes, so both are its params then.
PRUNE = config["compress"]["prune"]


rule compress:
    input:
        quant=f"{SEED_DIR}/quant.pgt",
    output:
        f"{SEED_DIR}/artifact.pgz",
    params:
        cfg=section("compress", ["codec", "level", "pack", "shuffle", "prune"] + (["budget_bytes"] if PRUNE else [])),
        code_bytes=pgolf.provenance.code_bytes() if PRUNE else 0,
        code=code("compress"),
    log:
        f"{RUN}/logs/compress_seed{{seed}}.log",
    benchmark:
        f"{RUN}/benchmarks/compress_seed{{seed}}.tsv"
    shell:
        "pgolf compress --quant {input.quant:q} --cfg {params.cfg:q} --code-bytes {params.code_bytes:q} "
        "--out {output:q} > {log:q} 2>&1"


# Its own rule so that editing code reruns only this check, not compression and evaluation.
rule size:
    input:
        artifact=f"{SEED_DIR}/artifact.pgz",
    output:
        f"{SEED_DIR}/size.json",
    params:
        cfg=section("compress"),
        code_bytes=pgolf.provenance.code_bytes(),
        code=code("size"),
    log:
        f"{RUN}/logs/size_seed{{seed}}.log",
    shell:
        "pgolf size --artifact {input.artifact:q} --cfg {params.cfg:q} --out {output:q} > {log:q} 2>&1"
