# All seeds' results -> summary.json, summary.parquet and summary.md (the Snakefile prints it on success).

BASELINE = config["compare"]["baseline_run"]
BASELINE_SUMMARY = f"results/{BASELINE}/summary.json" if BASELINE else []
if BASELINE and not Path(BASELINE_SUMMARY).exists():
    raise WorkflowError(f"compare.baseline_run: {BASELINE_SUMMARY} does not exist; finish run {BASELINE!r} first "
                        "(snakemake with its config), or give baseline_mean and baseline_std instead")


rule aggregate:
    localrule: is_local("aggregate")
    input:
        evals=expand(f"{RUN}/seed{{seed}}/eval.json", seed=config["seeds"]),
        sizes=expand(f"{RUN}/seed{{seed}}/size.json", seed=config["seeds"]),
        trains=expand(f"{RUN}/seed{{seed}}/train.json", seed=config["seeds"]),
        # the baseline run's summary: a rerun baseline reruns the comparison
        baseline=BASELINE_SUMMARY,
    output:
        json=f"{RUN}/summary.json",
        parquet=f"{RUN}/summary.parquet",
        table=f"{RUN}/summary.md",
    params:
        run=config["run"],
        seeds=config["seeds"],
        compare=section("compare"),
        # a flag and its path, or nothing: a list, so that :q quotes each element
        baseline=["--baseline-summary", BASELINE_SUMMARY] if BASELINE else [],
        code=code("aggregate"),
    log:
        f"{RUN}/logs/aggregate.log",
    shell:
        "pgolf aggregate --run {params.run:q} --seeds {params.seeds:q} --eval {input.evals:q} --size {input.sizes:q} "
        "--train {input.trains:q} --out-json {output.json:q} --out-parquet {output.parquet:q} --out-table {output.table:q} "
        "--compare {params.compare:q} {params.baseline:q} > {log:q} 2>&1"


rule record:
    localrule: is_local("record")
    input:
        # the README's table is rendered from summary.json (checked), never copied from summary.md
        summary=f"{RUN}/summary.json",
        # every file pgolf record reads: a retrained seed reruns the record, never reads a missing file
        evals=expand(f"{RUN}/seed{{seed}}/eval.json", seed=config["seeds"]),
        sizes=expand(f"{RUN}/seed{{seed}}/size.json", seed=config["seeds"]),
        trains=expand(f"{RUN}/seed{{seed}}/train.json", seed=config["seeds"]),
        # the artifacts themselves: submission.json takes their bytes from the files, not from size.json
        artifacts=expand(f"{RUN}/seed{{seed}}/artifact.pgz", seed=config["seeds"]),
        logs=expand(f"{RUN}/logs/train_seed{{seed}}.log", seed=config["seeds"]),
    output:
        directory(f"{RUN}/record"),
    params:
        seeds=config["seeds"],
        config=json.dumps(config, sort_keys=True),
        code_bytes=pgolf.pipeline.bundle.code_bytes(),
        code=code("record"),
    log:
        f"{RUN}/logs/record.log",
    shell:
        "pgolf record --summary {input.summary:q} --seeds {params.seeds:q} "
        "--eval {input.evals:q} --size {input.sizes:q} --train {input.trains:q} --artifact {input.artifacts:q} "
        "--log {input.logs:q} "
        "--config {params.config:q} --out {output:q} > {log:q} 2>&1"


rule plots:
    localrule: is_local("plots")
    input:
        evals=expand(f"{RUN}/seed{{seed}}/eval.json", seed=config["seeds"]),
        sizes=expand(f"{RUN}/seed{{seed}}/size.json", seed=config["seeds"]),
        metrics=expand(f"{RUN}/seed{{seed}}/metrics.parquet", seed=config["seeds"]),
        quant=expand(f"{RUN}/seed{{seed}}/quant.pgt", seed=config["seeds"]),
    output:
        loss=report(f"{RUN}/plots/loss.png", caption="report/loss.rst", category="Training"),
        bpb=report(f"{RUN}/plots/bpb.png", caption="report/bpb.rst", category="Evaluation"),
        bytes=report(f"{RUN}/plots/bytes.png", caption="report/bytes.rst", category="Artifact"),
    params:
        seeds=config["seeds"],
        out_dir=f"{RUN}/plots",
        code=code("plots"),
    log:
        f"{RUN}/logs/plots.log",
    shell:
        "pgolf plots --seeds {params.seeds:q} --eval {input.evals:q} --size {input.sizes:q} "
        "--metrics {input.metrics:q} --quant {input.quant:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
