# pgolf: raw text -> tokenizer -> shards -> training per seed -> quantize -> compress -> evaluate -> summary.
# All logic lives in the pgolf package; rules only name files and call `pgolf <stage>`.

from snakemake.utils import min_version

min_version("9.19")


configfile: "config.yaml"


report: "rules/report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/order.smk"
include: "rules/train.smk"
include: "rules/quant.smk"
include: "rules/eval.smk"
include: "rules/report.smk"


rule all:
    localrule: True  # seconds of work: no queue round trip on SLURM
    default_target: True
    input:
        run_targets(),
        [f"{STUDY}/comparison.md"] if STUDY else [],


onsuccess:
    print_summary()
