# Val BPB of the EMA weights, of the weights read back from the artifact, and by sliding window.
# With pruning on it also reads the quantized tensors before pruning, to score what pruning cost.


rule evaluate:
    input:
        data=DATASET_DIR,
        tokenizer=TOKENIZER,
        ema=f"{SEED_DIR}/ema.pgt",
        artifact=f"{SEED_DIR}/artifact.pgz",
        quant=f"{SEED_DIR}/quant.pgt" if PRUNE else [],
    output:
        f"{SEED_DIR}/eval.json",
    params:
        cfg=section("eval"),
        device=config["device"],
        precision=config["precision"],
        # a flag and its path, or nothing: a list, so that :q quotes each element
        unpruned=["--unpruned", f"{SEED_DIR}/quant.pgt"] if PRUNE else [],
        code=code("evaluate"),
    threads: threads_of("evaluate")
    resources:
        nproc=NPROC,
        gpu=gpus("evaluate"),
        **slurm("evaluate"),
    group: group_of("evaluate")
    log:
        f"{RUN}/logs/evaluate_seed{{seed}}.log",
    benchmark:
        f"{RUN}/benchmarks/evaluate_seed{{seed}}.tsv"
    shell:
        TORCHRUN + " evaluate --data {input.data:q} --tokenizer {input.tokenizer:q} --ema {input.ema:q} "
        "--artifact {input.artifact:q} --cfg {params.cfg:q} --device {params.device:q} --precision {params.precision:q} "
        "{params.unpruned:q} --out {output:q} > {log:q} 2>&1"
