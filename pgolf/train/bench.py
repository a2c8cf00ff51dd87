"""`pgolf bench FILE...`: training speed of a config on random tokens: ms/step, tokens/s, model
FLOPs utilization and peak memory, at a given number of processes (it starts torchrun itself).

The step is the trainer's own (same optimizers, grad accumulation, all-reduce or Parallel Muon,
autocast and torch.compile), so the figures are what `pgolf train` will see minus data loading.
With `--forward SEQS` it times instead the scoring pass of evaluation and chunk TTT: the model's
forward without gradients on SEQS rows of eval.seq_len, under eval.compile, in one process (random
tokens, so a BOS, and with doc_attention a document edge, only at its random rate).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from pgolf.config import load
from pgolf.model.gpt import GPT, layer_order
from pgolf.runtime.device import autocast, compiled
from pgolf.runtime.distributed import setup_distributed
from pgolf.train.train import Trainer, TrainJob, memory_mb

# Dense bf16 tensor-core peaks in TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.0, "4090": 165.2}


class RandomBatches:
    """Uniform random tokens with the loader's interface: no disk in the measurement."""

    def __init__(self, vocab: int, device: torch.device, seed: int) -> None:
        self.vocab, self.device = vocab, device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def next_batch(self, seqs: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(0, self.vocab, (seqs, seq_len + 1), device=self.device, generator=self.gen)
        return t[:, :-1], t[:, 1:]


def flops_per_token(model: GPT, seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul weight per pass (the head included, each looped block
    counted once per pass) plus causal attention's 6 * seq_len * dim per virtual layer."""
    passes = layer_order(model.cfg)
    per_block = [sum(m.weight.numel() for m in b.modules() if isinstance(m, torch.nn.Linear)) for b in model.blocks]
    blocks = sum(per_block[i] for i in passes)
    extras = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name.split(".")[0] in ("bigram", "ve", "lm_head"))
    head = 0 if model.lm_head is not None else model.tok_emb.weight.numel()
    return 6.0 * (blocks + extras + head) + 6.0 * len(passes) * seq_len * model.cfg["model_dim"]


def peak_tflops(device: torch.device, given: float) -> float:
    if given > 0:
        return given
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
    return 0.0


def bench_job(cfg: dict, device: str) -> TrainJob:
    """The config's training run, less what a measurement must not touch: no dataset (random tokens
    instead), no checkpoints, no outputs."""
    return TrainJob(model_cfg=cfg["model"], train_cfg=cfg["train"], loader_cfg=cfg["loader"], data=None,
                    vocab_size=cfg["tokenizer"]["vocab_size"], seed=0, device=device, precision=cfg["precision"],
                    out_dir=None, ckpt_dir=None, shard_order=None)


def measure(cfg: dict, args: argparse.Namespace) -> dict | None:
    job = bench_job(cfg, args.device)
    tr = Trainer(job, batches=lambda rank, device: RandomBatches(job.vocab_size, device, 1000 + rank))
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # compile and allocator warm-up
        tr.train_step()
    tr.sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        tr.train_step()
    tr.sync()
    dt = (time.perf_counter() - t0) / args.steps
    if tr.rank:
        return None
    t = cfg["train"]
    tps = t["batch_tokens"] / dt
    peak = peak_tflops(tr.device, args.peak_tflops) * 1e12 * tr.world
    fpt = flops_per_token(tr.model, t["seq_len"])
    n = sum(p.numel() for p in tr.model.parameters())
    return {"processes": tr.world, "device": str(tr.device), "parameters": n,
            "ms_per_step": 1000 * dt, "tokens_per_s": tps, "flops_per_token": fpt,
            "mfu": fpt * tps / peak if peak else None, "peak_memory_mb": memory_mb(tr.device),
            "grad_accum": tr.accum, "compiled": tr.forward is not tr.model, "precision": tr.precision,
            "warmup_seconds": warmup_s}


def measure_forward(cfg: dict, args: argparse.Namespace) -> dict:
    """Seconds of the scoring forward, after args.warmup forwards (which compile whatever compiles)."""
    _, _, device = setup_distributed(args.device)
    torch.manual_seed(0)
    model = GPT(cfg["tokenizer"]["vocab_size"], cfg["model"]).to(device).eval()
    fwd = compiled(model, cfg["eval"]["compile"], device)
    idx, _ = RandomBatches(model.vocab_size, device, 1000).next_batch(args.forward, cfg["eval"]["seq_len"])

    def run() -> float:
        with torch.inference_mode(), autocast(device, cfg["precision"]):  # as score_windows
            return fwd(idx)[0, 0, 0].item()  # .item() waits for the device

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        run()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        run()
    dt = (time.perf_counter() - t0) / args.steps
    return {"device": str(device), "rows": tuple(idx.shape), "ms_per_forward": 1000 * dt,
            "tokens_per_s": idx.numel() / dt, "compiled": fwd is not model, "precision": cfg["precision"],
            "attention": cfg["model"]["attention"], "doc_attention": cfg["model"]["doc_attention"],
            "warmup_seconds": warmup_s}


def report_forward(r: dict) -> str:
    docs = f"doc_attention on, attention {r['attention']}" if r["doc_attention"] else "doc_attention off"
    return (f"forward without gradients of {r['rows'][0]} x {r['rows'][1]} tokens on {r['device']} ({docs}, "
            f"compiled {r['compiled']}, precision {r['precision']}, warm-up {r['warmup_seconds']:.1f}s): "
            f"{r['ms_per_forward']:.1f} ms, {r['tokens_per_s']:,.0f} tokens/s")


def report(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (give --peak-tflops)"
    return (f"{r['parameters']:,} params on {r['processes']} x {r['device']} (grad accum {r['grad_accum']}, "
            f"compiled {r['compiled']}, {r['precision']}, warm-up {r['warmup_seconds']:.1f}s): "
            f"{r['ms_per_step']:.1f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, "
            f"MFU {mfu}, peak memory {r['peak_memory_mb']:,.0f} MB")


def child_args(args: argparse.Namespace) -> list[str]:
    out = [*args.files, "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
           "--peak-tflops", str(args.peak_tflops)]
    return out + (["--json", args.json] if args.json else [])


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf bench", description=__doc__)
    ap.add_argument("files", nargs="+", help="config.yaml, then presets (later files win)")
    ap.add_argument("--nproc", type=int, default=1, help="processes (one per GPU on CUDA)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak for MFU (default: known GPUs)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--forward", type=int, default=0, metavar="SEQS",
                    help="time evaluation's forward (no gradients) on SEQS rows of eval.seq_len, not a training step")
    args = ap.parse_args(argv)
    if args.forward:
        r = measure_forward(load(*args.files), args)
        return emit(report_forward(r), r, args.json)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        # The children learn the process count from torchrun's WORLD_SIZE; no --nproc for torchrun to misread.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "pgolf", "bench", *child_args(args)]
        raise SystemExit(subprocess.call(cmd))
    nproc = int(os.environ.get("WORLD_SIZE", args.nproc))
    cfg = load(*args.files, overrides={"train": {"nproc": nproc}})
    r = measure(cfg, args)
    if r is not None:
        emit(report(r), r, args.json)


def emit(text: str, r: dict, json_path: str | None) -> None:
    print(text, flush=True)
    if json_path:
        from pgolf.formats.io import write_json

        write_json(json_path, r)
