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
        f"{SEED_DIR}/artifact.pgz",
    params:
        cfg=section("compress", ["codec", "level"]),  # the budget is the size rule's business
        code=code("compress"),
    log:
        f"{RUN}/logs/compress_seed{{seed}}.log",
    shell:
        "pgolf compress --quant {input.quant} --cfg {params.cfg:q} --out {output} > {log} 2>&1"


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
        "pgolf size --artifact {input.artifact} --cfg {params.cfg:q} --out {output} > {log} 2>&1"
