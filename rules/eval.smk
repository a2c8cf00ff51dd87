# Val BPB of the EMA weights, of the weights read back from the artifact, and by sliding window.


rule evaluate:
    input:
        data=DATASET_DIR,
        tokenizer=TOKENIZER,
        ema=f"{SEED_DIR}/ema.pgt",
        artifact=f"{SEED_DIR}/artifact.pgz",
    output:
        f"{SEED_DIR}/eval.json",
    params:
        cfg=section("eval"),
        device=config["device"],
        code=code("evaluate"),
    threads: workflow.cores
    resources:
        nproc=NPROC,
        gpu=NPROC if config["device"] == "cuda" else 0,
    log:
        f"{RUN}/logs/evaluate_seed{{seed}}.log",
    benchmark:
        f"{RUN}/benchmarks/evaluate_seed{{seed}}.tsv"
    shell:
        TORCHRUN + " evaluate --data {input.data:q} --tokenizer {input.tokenizer:q} --ema {input.ema:q} "
        "--artifact {input.artifact:q} --cfg {params.cfg:q} --device {params.device:q} --out {output:q} > {log:q} 2>&1"
