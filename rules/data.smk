# Corpus -> documents (parquet with a train/val split) -> tokenizer -> binary shards.

import pgolf.data.documents


rule fetch_corpus:
    localrule: is_local("fetch_corpus")
    output:
        directory(RAW_DIR),
    params:
        code=code("fetch_corpus"),
    log:
        "data/logs/fetch_corpus.log",
    retries: 2
    shell:
        "pgolf fetch-corpus --out {output:q} > {log:q} 2>&1"


# data.source local: every file documents reads from data.paths (the files inside listed folders
# too) is an input, so that editing, adding or removing one reruns documents and what follows.
# Listed once per set of paths (a study's variant may name its own), as the stage lists them, all at
# parse time: a path that yields no document fails here, before any job.
def corpus_of(paths):
    try:
        return [config_path("data.paths", f) for f in pgolf.data.documents.corpus_files(list(paths))]
    except pgolf.errors.PgolfError as e:
        raise WorkflowError(str(e)) from None


CORPUS = {}
for _path, (_run, _keys, _cfg) in PLAN.data.items():
    if _path.startswith("data/docs/") and _cfg["data"]["source"] == "local":
        CORPUS[_path] = corpus_of(_cfg["data"]["paths"])


def documents_input(wildcards):
    if config["data"]["source"] == "embedded":
        return [RAW_DIR]
    return CORPUS.get(f"data/docs/{wildcards.docs}.parquet", [])


# A study's runs share one data source, so one set of data rules serves them; each data path takes
# its keys from the runs that build it (pgolf/pipeline/plan.py refuses two that disagree).
def docs_cfg(wildcards):
    return data_cfg(f"data/docs/{wildcards.docs}.parquet")


def dataset_cfg(wildcards):
    return data_cfg(f"data/datasets/{wildcards.dataset}")


def docs_of(wildcards):
    return pgolf.pipeline.plan.Data.of(dataset_cfg(wildcards)).docs


rule documents:
    input:
        documents_input,
    output:
        "data/docs/{docs}.parquet",
    params:
        # without the keys documents does not read (pgolf/pipeline/plan.py says why)
        cfg=lambda wildcards: section("data", without=pgolf.pipeline.plan.DOCS_WITHOUT, cfg=docs_cfg(wildcards)),
        raw=RAW_DIR if config["data"]["source"] == "embedded" else "",
        code=code("documents"),
    resources:
        **slurm("documents"),
    group: group_of("documents")
    log:
        "data/logs/documents_{docs}.log",
    shell:
        "pgolf documents --cfg {params.cfg:q} --raw={params.raw:q} --out {output:q} > {log:q} 2>&1"


if config["data"]["source"] == "fineweb":

    rule fetch_fineweb:
        localrule: is_local("fetch_fineweb")
        output:
            dataset=directory("data/datasets/{dataset}"),
            tokenizer="data/tokenizers/{dataset}.model",
        params:
            hub=lambda wildcards: json.dumps(dataset_cfg(wildcards)["data"]["hub"], sort_keys=True),
            cache="data/hub",
            code=code("fetch_fineweb"),
        log:
            "data/logs/fetch_fineweb_{dataset}.log",
        retries: 2
        shell:
            "pgolf fetch-fineweb --cfg {params.hub:q} --cache {params.cache:q} --out {output.dataset:q} "
            "--tokenizer {output.tokenizer:q} > {log:q} 2>&1"

else:

    rule tokenizer:
        input:
            docs_of,
        output:
            "data/tokenizers/{dataset}.model",
        params:
            cfg=lambda wildcards: section("tokenizer", cfg=dataset_cfg(wildcards)),
            code=code("tokenizer"),
        threads: threads_of("tokenizer")
        resources:
            **slurm("tokenizer"),
        group: group_of("tokenizer")
        log:
            "data/logs/tokenizer_{dataset}.log",
        shell:
            "pgolf tokenizer --docs {input:q} --cfg {params.cfg:q} --out {output:q} > {log:q} 2>&1"


    # With tokenizer.caseops the dataset folder also holds a byte sidecar beside each shard
    # (fineweb_{split}_bytes_NNNNNN.bin, listed with its sha256 in manifest.json): it is part of this
    # rule's directory output, and evaluate, which counts BPB from it, takes the folder as input.
    rule shards:
        input:
            docs=docs_of,
            tokenizer="data/tokenizers/{dataset}.model",
        output:
            directory("data/datasets/{dataset}"),
        params:
            # the documents' keys reach shards through the documents file; name is in the paths
            cfg=lambda wildcards: section("data", without=("source", "name", "paths", "val_fraction", "split_seed",
                                                           "hub"), cfg=dataset_cfg(wildcards)),
            caseops=lambda wildcards: ["--caseops"] if dataset_cfg(wildcards)["tokenizer"]["caseops"] else [],
            code=code("shards"),
        threads: threads_of("shards")
        resources:
            **slurm("shards"),
        group: group_of("shards")
        log:
            "data/logs/shards_{dataset}.log",
        shell:
            "pgolf shards --docs {input.docs:q} --tokenizer {input.tokenizer:q} --cfg {params.cfg:q} "
            "{params.caseops:q} --out {output:q} > {log:q} 2>&1"
