"""`pgolf plots`: the run's figures for `snakemake --report`: training loss per seed, BPB at each
stage per seed, and where the artifact's bytes go."""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from pgolf.formats import tensorfile  # noqa: E402
from pgolf.formats.io import atomic_path, read_parquet  # noqa: E402
from pgolf.formats.results import read_result  # noqa: E402
from pgolf.report.inputs import add_seed_files, seed_files  # noqa: E402

Files = dict[int, dict[str, Path]]  # seed -> kind -> path (pgolf.report.inputs.seed_files)

STAGES = ("pre_quant", "post_quant", "sliding")


def save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def loss_figure(files: Files, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for s, f in files.items():
        t = read_parquet(f["metrics"], ["step", "loss"])
        ax.plot(t.column("step").to_pylist(), t.column("loss").to_pylist(), label=f"seed {s}", lw=1)
    ax.set(xlabel="step", ylabel="train loss (nats/token)", title="Training loss")
    ax.legend()
    save(fig, out)


def bpb_figure(files: Files, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(files)
    evals = {s: read_result(f["eval"]) for s, f in files.items()}
    for i, (s, ev) in enumerate(evals.items()):
        xs = [j + i * width for j in range(len(STAGES))]
        ax.bar(xs, [ev[k]["val_bpb"] for k in STAGES], width, label=f"seed {s}")
    values = [ev[k]["val_bpb"] for ev in evals.values() for k in STAGES]
    span = max(values) - min(values) or 0.01
    ax.set_ylim(min(values) - span, max(values) + span)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(STAGES))], [k.replace("_", " ") for k in STAGES])
    ax.set(ylabel="val BPB", title="BPB at each stage")
    ax.legend()
    save(fig, out)


def tensor_group(name: str) -> str:
    if name.startswith("tok_emb"):
        return "embedding"
    for key in ("attn", "mlp"):
        if f".{key}." in name:
            return key
    return "control"


def bytes_figure(files: Files, out: Path) -> None:
    """Left: model and code bytes against the budget per seed. Right: raw bytes per tensor group."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [read_result(f["size"]) for f in files.values()]
    labels = [str(s) for s in files]
    first = next(iter(files))
    left.bar(labels, [z["model_bytes"] for z in sizes], label="model (compressed)")
    left.bar(labels, [z["code_bytes"] for z in sizes], bottom=[z["model_bytes"] for z in sizes], label="code")
    left.axhline(sizes[0]["budget_bytes"], color="red", ls="--", label="budget")
    left.set(xlabel="seed", ylabel="bytes", title="Artifact size")
    left.legend()
    tensors, _ = tensorfile.load(files[first]["quant"])
    groups: dict[str, int] = {}
    for name, t in tensors.items():
        g = tensor_group(name)
        groups[g] = groups.get(g, 0) + t.numel() * t.element_size()
    right.bar(list(groups), list(groups.values()))
    right.set(ylabel="bytes before compression", title=f"Quantized tensors (seed {first})")
    save(fig, out)


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf plots", description=__doc__)
    add_seed_files(ap, "eval", "size", "metrics", "quant")
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    files = seed_files(args.seeds, eval=args.eval, size=args.size, metrics=args.metrics, quant=args.quant)
    loss_figure(files, args.out_dir / "loss.png")
    bpb_figure(files, args.out_dir / "bpb.png")
    bytes_figure(files, args.out_dir / "bytes.png")
