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
# Listed once, as the stage lists them; a path that yields no document fails here, before any job.
CORPUS = []
if config["data"]["source"] == "local":
    try:
        CORPUS = [config_path("data.paths", f) for f in pgolf.data.documents.corpus_files(config["data"]["paths"])]
    except pgolf.errors.PgolfError as e:
        raise WorkflowError(str(e)) from None


def documents_input(wildcards):
    return [RAW_DIR] if config["data"]["source"] == "embedded" else CORPUS


rule documents:
    input:
        documents_input,
    output:
        DOCS,
    params:
        # name is in the output's path; hub is fetch_fineweb's and shard_tokens the shards' stage's:
        # passed here they would rebuild documents, the tokenizer and everything after for nothing
        cfg=section("data", without=("name", "hub", "shard_tokens")),
        raw=RAW_DIR if config["data"]["source"] == "embedded" else "",
        code=code("documents"),
    resources:
        **slurm("documents"),
    group: group_of("documents")
    log:
        f"data/logs/documents_{DATASET}.log",
    shell:
        "pgolf documents --cfg {params.cfg:q} --raw={params.raw:q} --out {output:q} > {log:q} 2>&1"


if config["data"]["source"] == "fineweb":

    rule fetch_fineweb:
        localrule: is_local("fetch_fineweb")
        output:
            dataset=directory(DATASET_DIR),
            tokenizer=TOKENIZER,
        params:
            hub=json.dumps(config["data"]["hub"], sort_keys=True),
            cache="data/hub",
            code=code("fetch_fineweb"),
        log:
            f"data/logs/fetch_fineweb_{DATASET}_sp{VOCAB}.log",
        retries: 2
        shell:
            "pgolf fetch-fineweb --cfg {params.hub:q} --cache {params.cache:q} --out {output.dataset:q} "
            "--tokenizer {output.tokenizer:q} > {log:q} 2>&1"

else:

    rule tokenizer:
        input:
            DOCS,
        output:
            TOKENIZER,
        params:
            cfg=section("tokenizer"),
            code=code("tokenizer"),
        threads: threads_of("tokenizer")
        resources:
            **slurm("tokenizer"),
        group: group_of("tokenizer")
        log:
            f"data/logs/tokenizer_{DATASET}_sp{VOCAB}{_CASEOPS}.log",
        shell:
            "pgolf tokenizer --docs {input:q} --cfg {params.cfg:q} --out {output:q} > {log:q} 2>&1"


    # With tokenizer.caseops the dataset folder also holds a byte sidecar beside each shard
    # (fineweb_{split}_bytes_NNNNNN.bin, listed with its sha256 in manifest.json): it is part of this
    # rule's directory output, and evaluate, which counts BPB from it, takes the folder as input.
    rule shards:
        input:
            docs=DOCS,
            tokenizer=TOKENIZER,
        output:
            directory(DATASET_DIR),
        params:
            # the documents' keys reach shards through the documents file; name is in the paths
            cfg=section("data", without=("source", "name", "paths", "val_fraction", "split_seed", "hub")),
            caseops=["--caseops"] if config["tokenizer"]["caseops"] else [],
            code=code("shards"),
        threads: threads_of("shards")
        resources:
            **slurm("shards"),
        group: group_of("shards")
        log:
            f"data/logs/shards_{DATASET}_sp{VOCAB}{_CASEOPS}.log",
        shell:
            "pgolf shards --docs {input.docs:q} --tokenizer {input.tokenizer:q} --cfg {params.cfg:q} "
            "{params.caseops:q} --out {output:q} > {log:q} 2>&1"
