"""`pgolf fetch-fineweb`: the challenge's pre-tokenized FineWeb shards and tokenizer from the Hugging Face Hub.

Layout of the dataset repositories (willdepueoai/parameter-golf; kevclark/parameter-golf for sp4096
and sp8192; romeerp/parameter-golf-caseops-v1 for the CaseOps export), under `data.hub.remote_root`:
  manifest.json
  datasets/fineweb10B_<variant>/fineweb_{train,val}_NNNNNN.bin
  datasets/fineweb10B_<variant>/fineweb_val_bytes_NNNNNN.bin   (CaseOps: original bytes per token)
  tokenizers/fineweb_<vocab>_bpe<variant suffix>.model
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

from pgolf.data import caseops
from pgolf.formats.shards import HEADER_BYTES, ShardError, list_shards, read_header, sidecar_name
from pgolf.errors import PgolfError
from pgolf.formats.io import atomic_dir, atomic_path, write_json


def _split_variant(variant: str) -> tuple[int, str]:
    m = re.fullmatch(r"sp(\d+)(_[a-z0-9_]+)?", variant)
    if not m:
        raise PgolfError(f"data.hub.variant: {variant!r} is not an sp<vocab>[_name] variant (sp1024, sp8192, "
                         "sp8192_lossless_caps_caseops_v1_reserved, ...)")
    return int(m.group(1)), m.group(2) or ""


def vocab_of(variant: str) -> int:
    return _split_variant(variant)[0]


def is_caseops(variant: str) -> bool:
    """A CaseOps export: text lowercased with case operators, BPB counted from a byte sidecar."""
    return "caseops" in _split_variant(variant)[1]


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


def val_sidecar(tokenizer: Path, val: list[Path], sidecars: list[Path]) -> dict:
    """The manifest entries of a CaseOps export: its tokenizer has the operators as pieces of their
    own, and each val byte sidecar is as long as its shard; BPB is counted from their bytes."""
    import numpy as np
    import sentencepiece as spm

    caseops.byte_table(spm.SentencePieceProcessor(model_file=str(tokenizer)), f"downloaded tokenizer {tokenizer.name}")
    total = 0
    for shard, side in zip(val, sidecars, strict=True):
        try:
            n, n_side = read_header(shard), read_header(side)
        except ShardError as e:
            raise PgolfError(f"downloaded byte sidecar failed its check: {e}") from None
        if n != n_side:
            raise PgolfError(f"downloaded byte sidecar {side.name} has {n_side} entries for the {n} tokens "
                             f"of {shard.name}")
        total += int(np.fromfile(side, dtype="<u2", offset=HEADER_BYTES).astype(np.int64).sum())
    return {"byte_sidecar": {"shards": [p.name for p in sidecars],
                             "sha256": [hashlib.sha256(p.read_bytes()).hexdigest() for p in sidecars]},
            "bytes": total}


def copy_hashed(src: Path, dst: Path, chunk: int = 1 << 24) -> str:
    """Copy a downloaded shard into the dataset; the sha256 of the bytes written, for the manifest."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(chunk):
            digest.update(block)
            fout.write(block)
    return digest.hexdigest()


def split_entry(names: list[str], tokens: dict[str, int], digests: dict[str, str]) -> dict:
    """A split's manifest entry: its shards in order, their token total and each one's sha256."""
    return {"shards": names, "tokens": sum(tokens[n] for n in names), "sha256": [digests[n] for n in names]}


def fetch(cfg: dict, cache: Path, dataset_out: Path, tokenizer_out: Path) -> dict:
    vocab, suffix = _split_variant(cfg["variant"])
    dataset = f"fineweb10B_{cfg['variant']}"
    manifest = json.loads(_download(cfg, remote(cfg, "manifest.json"), cache).read_text())
    n_train, n_val = shard_counts(manifest, dataset)
    if n_train is not None and cfg["train_shards"] > n_train:
        raise PgolfError(f"data.hub.train_shards: {dataset} has {n_train} train shards, {cfg['train_shards']} asked")
    files = [remote(cfg, "datasets", dataset, f"fineweb_val_{i:06d}.bin") for i in range(n_val or 1)]
    files += [remote(cfg, "datasets", dataset, f"fineweb_train_{i:06d}.bin") for i in range(cfg["train_shards"])]
    sidecars = [remote(cfg, "datasets", dataset, sidecar_name("val", Path(f).name)) for f in files[: n_val or 1]]
    local = [_download(cfg, f, cache) for f in files]
    local_sidecars = [_download(cfg, f, cache) for f in sidecars] if is_caseops(cfg["variant"]) else []
    tokenizer = _download(cfg, remote(cfg, "tokenizers", f"fineweb_{vocab}_bpe{suffix}.model"), cache)
    tokens = {}
    for path in local:
        try:
            tokens[path.name] = read_header(path)  # magic, version and size = 1024 + 2 * tokens
        except ShardError as e:
            raise PgolfError(f"downloaded shard failed its check: {e}") from None
    extra = val_sidecar(tokenizer, local[: n_val or 1], local_sidecars) if local_sidecars else {}
    with atomic_dir(dataset_out) as staging:
        digests = {path.name: copy_hashed(path, staging / path.name) for path in local}
        for path in local_sidecars:
            shutil.copyfile(path, staging / path.name)
        summary = {"source": f"{cfg['repo_id']}@{cfg['revision']}", "variant": cfg["variant"], "vocab_size": vocab,
                   "tokenizer": tokenizer_out.name, "tokenizer_sha256": tokenizer_sha256(tokenizer, vocab),
                   "splits": {s: split_entry([p.name for p in list_shards(staging, s)], tokens, digests)
                              for s in ("train", "val")}}
        if extra:
            summary["text_transform"] = caseops.NAME
            summary["splits"]["val"].update(extra)
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
