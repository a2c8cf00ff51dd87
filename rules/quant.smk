# EMA weights -> quantized tensors -> compressed artifact; size.json counts code plus model bytes.


rule quantize:
    input:
        ema=f"{SEED_DIR}/ema.pgt",
    output:
        f"{SEED_DIR}/quant.pgt",
    params:
        cfg=section("quant"),
        code=code("quantize"),
    log:
        f"{RUN}/logs/quantize_seed{{seed}}.log",
    shell:
        "pgolf quantize --weights {input.ema} --cfg {params.cfg:q} --out {output} > {log} 2>&1"


rule compress:
    input:
        quant=f"{SEED_DIR}/quant.pgt",
    output:
        artifact=f"{SEED_DIR}/artifact.pgz",
        size=f"{SEED_DIR}/size.json",
    params:
        cfg=section("compress"),
        code=code("compress"),
    log:
        f"{RUN}/logs/compress_seed{{seed}}.log",
    shell:
        "pgolf compress --quant {input.quant} --cfg {params.cfg:q} --out {output.artifact} "
        "--size {output.size} > {log} 2>&1"
