# Each run's seeds -> summary.json, summary.parquet and summary.md, its record folder and plots, in
# the run's own folder (results/<run>/, or results/<study>/<variant>/); a study's comparison of every
# variant with its baseline. The Snakefile prints the summary (or the comparison) on success.


def baseline_summary(cfg):
    """compare.baseline_run's summary: a rerun baseline reruns the comparison."""
    name = cfg["compare"]["baseline_run"]
    if not name:
        return []
    path = f"results/{name}/summary.json"
    if not Path(path).exists():
        raise WorkflowError(f"compare.baseline_run: {path} does not exist; finish run {name!r} first "
                            "(snakemake with its config), or give baseline_mean and baseline_std instead")
    return path


def gptq(wildcards):
    return run_of(wildcards).cfg["quant"]["method"] == "gptq"


def baseline_flag(cfg):
    path = baseline_summary(cfg)
    return ["--baseline-summary", path] if path else []


for _run in PLAN.runs.values():
    baseline_summary(_run.cfg)  # fail at parse time, before any job starts


rule aggregate:
    localrule: is_local("aggregate")
    input:
        evals=lambda wildcards: run_of(wildcards).files("evaluate", "eval"),
        sizes=lambda wildcards: run_of(wildcards).files("size", "size"),
        trains=lambda wildcards: run_of(wildcards).files("train", "summary"),
        baseline=lambda wildcards: baseline_summary(run_of(wildcards).cfg),
    output:
        json="results/{run}/summary.json",
        parquet="results/{run}/summary.parquet",
        table="results/{run}/summary.md",
        stages="results/{run}/stages.json",
    params:
        run=lambda wildcards: run_of(wildcards).name,
        seeds=lambda wildcards: run_of(wildcards).cfg["seeds"],
        compare=lambda wildcards: section("compare", cfg=run_of(wildcards).cfg),
        # a flag and its path, or nothing: a list, so that :q quotes each element
        baseline=lambda wildcards: baseline_flag(run_of(wildcards).cfg),
        stages=lambda wildcards: json.dumps(run_of(wildcards).stage_dirs(), sort_keys=True),
        code=code("aggregate"),
    log:
        "results/{run}/logs/aggregate.log",
    shell:
        "pgolf aggregate --run {params.run:q} --seeds {params.seeds:q} --eval {input.evals:q} --size {input.sizes:q} "
        "--train {input.trains:q} --out-json {output.json:q} --out-parquet {output.parquet:q} --out-table {output.table:q} "
        "--compare {params.compare:q} {params.baseline:q} --stages {params.stages:q} --out-stages {output.stages:q} "
        "> {log:q} 2>&1"


rule record:
    localrule: is_local("record")
    input:
        # the README's table is rendered from summary.json (checked), never copied from summary.md
        summary="results/{run}/summary.json",
        # every file pgolf record reads: a retrained seed reruns the record, never reads a missing file
        evals=lambda wildcards: run_of(wildcards).files("evaluate", "eval"),
        sizes=lambda wildcards: run_of(wildcards).files("size", "size"),
        trains=lambda wildcards: run_of(wildcards).files("train", "summary"),
        # the artifacts themselves: submission.json takes their bytes from the files, not from size.json
        artifacts=lambda wildcards: run_of(wildcards).files("compress", "artifact"),
        # the Hessians (GPTQ): their calibration seconds count as training's in the check
        hessians=lambda wildcards: run_of(wildcards).files("calibrate", "hessians") if gptq(wildcards) else [],
        # the dataset: the check's canonical val split and train/val document overlap
        data=lambda wildcards: run_of(wildcards).data.dataset,
        logs=lambda wildcards: run_of(wildcards).logs("train"),
    output:
        directory("results/{run}/record"),
    params:
        seeds=lambda wildcards: run_of(wildcards).cfg["seeds"],
        config=lambda wildcards: json.dumps(run_of(wildcards).cfg, sort_keys=True),
        # a flag and its paths, or nothing: a list, so that :q quotes each element
        hessians=lambda wildcards: ["--hessians", *run_of(wildcards).files("calibrate", "hessians")]
        if gptq(wildcards) else [],
        # the run's own packed train_gpt.py (pgolf record builds it from the config): a code edit reruns it
        code_bytes=lambda wildcards: pgolf.pipeline.bundle.code_bytes(
            pgolf.pipeline.features.needed(run_of(wildcards).cfg)),
        code=code("record"),
    log:
        "results/{run}/logs/record.log",
    shell:
        "pgolf record --summary {input.summary:q} --seeds {params.seeds:q} "
        "--eval {input.evals:q} --size {input.sizes:q} --train {input.trains:q} --artifact {input.artifacts:q} "
        "--log {input.logs:q} {params.hessians:q} --data {input.data:q} "
        "--config {params.config:q} --out {output:q} > {log:q} 2>&1"


rule plots:
    localrule: is_local("plots")
    input:
        evals=lambda wildcards: run_of(wildcards).files("evaluate", "eval"),
        sizes=lambda wildcards: run_of(wildcards).files("size", "size"),
        metrics=lambda wildcards: run_of(wildcards).files("train", "metrics"),
        quant=lambda wildcards: run_of(wildcards).files("quantize", "quant"),
    output:
        loss=report("results/{run}/plots/loss.png", caption="report/loss.rst", category="Training"),
        bpb=report("results/{run}/plots/bpb.png", caption="report/bpb.rst", category="Evaluation"),
        bytes=report("results/{run}/plots/bytes.png", caption="report/bytes.rst", category="Artifact"),
    params:
        seeds=lambda wildcards: run_of(wildcards).cfg["seeds"],
        out_dir=lambda wildcards: f"results/{wildcards.run}/plots",
        code=code("plots"),
    log:
        "results/{run}/logs/plots.log",
    shell:
        "pgolf plots --seeds {params.seeds:q} --eval {input.evals:q} --size {input.sizes:q} "
        "--metrics {input.metrics:q} --quant {input.quant:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


def run_targets():
    """What `rule all` asks of every run: its summary, record folder and plots."""
    return [f"{folder}/{name}" for folder in PLAN.runs
            for name in ("summary.json", "record", "plots/loss.png")]


if STUDY:

    rule study:
        localrule: is_local("study")
        input:
            summaries=[f"{folder}/summary.json" for folder in PLAN.runs],
        output:
            json=f"{STUDY}/comparison.json",
            table=f"{STUDY}/comparison.md",
            plot=report(f"{STUDY}/comparison.png", caption="report/comparison.rst", category="Study"),
        params:
            names=[run.name.split("/", 1)[1] for run in PLAN.runs.values()],
            study=section("study"),
            compare=section("compare"),
            code=code("study"),
        log:
            f"{STUDY}/logs/study.log",
        shell:
            "pgolf study --names {params.names:q} --summaries {input.summaries:q} --study {params.study:q} "
            "--compare {params.compare:q} --out-json {output.json:q} --out-table {output.table:q} "
            "--out-plot {output.plot:q} > {log:q} 2>&1"
