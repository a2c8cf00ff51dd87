"""`pgolf fetch-fineweb`: the challenge's pre-tokenized FineWeb shards and tokenizer from the Hugging Face Hub.

Layout of the dataset repositories (willdepueoai/parameter-golf; kevclark/parameter-golf for sp4096
and sp8192), under `data.hub.remote_root`:
  manifest.json
  datasets/fineweb10B_<variant>/fineweb_{train,val}_NNNNNN.bin
  tokenizers/fineweb_<vocab>_bpe.model
Downloads go through huggingface_hub (resumable: a broken transfer continues from where it
stopped; `HF_ENDPOINT` or `data.hub.endpoint` points it at a mirror). Every shard's header and size
are checked before the shards and tokenizer are put where the rest of the pipeline reads them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
from pathlib import Path

from pgolf.data.shards import ShardError, list_shards, read_header
from pgolf.errors import PgolfError
from pgolf.io import atomic_dir, atomic_path, write_json


def vocab_of(variant: str) -> int:
    m = re.fullmatch(r"sp(\d+)", variant)
    if not m:
        raise PgolfError(f"data.hub.variant: {variant!r} is not an sp<vocab> variant (sp1024, sp4096, sp8192, ...)")
    return int(m.group(1))


def remote(cfg: dict, *parts: str) -> str:
    return "/".join(p for p in (cfg["remote_root"], *parts) if p)


def _download(cfg: dict, filename: str, cache: Path) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    where = cfg["endpoint"] or "the Hub"
    try:
        return Path(hf_hub_download(cfg["repo_id"], filename, repo_type="dataset", revision=cfg["revision"],
                                    local_dir=cache, endpoint=cfg["endpoint"] or None))
    except RepositoryNotFoundError:
        raise PgolfError(f"data.hub.repo_id: dataset repository {cfg['repo_id']!r} not found on {where}") from None
    except RevisionNotFoundError:
        raise PgolfError(f"data.hub.revision: {cfg['revision']!r} not found in {cfg['repo_id']}") from None
    except EntryNotFoundError:
        raise PgolfError(f"{cfg['repo_id']} has no {filename!r} (data.hub.variant {cfg['variant']!r}, "
                         f"remote_root {cfg['remote_root']!r})") from None


def shard_counts(manifest: dict, dataset: str) -> tuple[int | None, int | None]:
    """(train, val) shard counts of `dataset` from the manifest's stats, wherever the entry sits."""
    stack = [manifest]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("name") == dataset and isinstance(node.get("stats"), dict):
                return node["stats"].get("files_train"), node["stats"].get("files_val")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None, None


def tokenizer_sha256(path: Path, vocab: int) -> str:
    """The downloaded tokenizer's sha256, for the manifest, once it is known to have `vocab` pieces."""
    import sentencepiece as spm

    try:
        pieces = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    except (OSError, RuntimeError) as e:
        raise PgolfError(f"downloaded tokenizer {path.name} is not a SentencePiece model ({e})") from None
    if pieces != vocab:
        raise PgolfError(f"downloaded tokenizer {path.name} has {pieces} pieces, not the variant's {vocab}")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(cfg: dict, cache: Path, dataset_out: Path, tokenizer_out: Path) -> dict:
    vocab = vocab_of(cfg["variant"])
    dataset = f"fineweb10B_{cfg['variant']}"
    manifest = json.loads(_download(cfg, remote(cfg, "manifest.json"), cache).read_text())
    n_train, n_val = shard_counts(manifest, dataset)
    if n_train is not None and cfg["train_shards"] > n_train:
        raise PgolfError(f"data.hub.train_shards: {dataset} has {n_train} train shards, {cfg['train_shards']} asked")
    files = [remote(cfg, "datasets", dataset, f"fineweb_val_{i:06d}.bin") for i in range(n_val or 1)]
    files += [remote(cfg, "datasets", dataset, f"fineweb_train_{i:06d}.bin") for i in range(cfg["train_shards"])]
    local = [_download(cfg, f, cache) for f in files]
    tokenizer = _download(cfg, remote(cfg, "tokenizers", f"fineweb_{vocab}_bpe.model"), cache)
    tokens = {}
    for path in local:
        try:
            tokens[path.name] = read_header(path)  # magic, version and size = 1024 + 2 * tokens
        except ShardError as e:
            raise PgolfError(f"downloaded shard failed its check: {e}") from None
    with atomic_dir(dataset_out) as staging:
        for path in local:
            shutil.copyfile(path, staging / path.name)
        summary = {"source": f"{cfg['repo_id']}@{cfg['revision']}", "variant": cfg["variant"], "vocab_size": vocab,
                   "tokenizer": tokenizer_out.name, "tokenizer_sha256": tokenizer_sha256(tokenizer, vocab),
                   "splits": {s: {"shards": [p.name for p in list_shards(staging, s)],
                                  "tokens": sum(n for name, n in tokens.items() if f"_{s}_" in name)}
                              for s in ("train", "val")}}
        write_json(staging / "manifest.json", summary)
    with atomic_path(tokenizer_out) as tmp:
        shutil.copyfile(tokenizer, tmp)
    return summary


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf fetch-fineweb", description=__doc__)
    ap.add_argument("--cfg", required=True, help="the data.hub config as JSON")
    ap.add_argument("--cache", required=True, help="download cache (resumable partial files live here)")
    ap.add_argument("--out", required=True, help="dataset folder to write")
    ap.add_argument("--tokenizer", required=True, help="tokenizer .model to write")
    args = ap.parse_args(argv)
    summary = fetch(json.loads(args.cfg), Path(args.cache), Path(args.out), Path(args.tokenizer))
    print(json.dumps(summary["splits"]), flush=True)
