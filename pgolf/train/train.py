"""`pgolf train`: one seed of training under torchrun, resumable from its last checkpoint."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn

from pgolf.errors import PgolfError
from pgolf.formats import tensorfile
from pgolf.formats.io import write_parquet
from pgolf.formats.results import read_result, write_result
from pgolf.formats.shards import open_dataset
from pgolf.model.gpt import GPT, token_losses
from pgolf.model.layers import GateLinear
from pgolf.optim.muon import Muon
from pgolf.runtime.device import PRECISIONS, autocast, bf16, compiled
from pgolf.runtime.distributed import setup_distributed, teardown
from pgolf.runtime.process import lock_seed
from pgolf.train import checkpoint
from pgolf.train.averaging import EMA, SWA
from pgolf.train.loader import DistributedLoader
from pgolf.train.schedule import grad_accum_steps, lr_scale, muon_momentum, recurrence_on


class Diverged(PgolfError):
    """Training produced a non-finite loss: nothing after it can be trusted."""


def param_groups(model: GPT, side_matrices: str = "muon") -> dict[str, list[nn.Parameter]]:
    """Muon takes the Linear weights; Adam the embedding tables, the untied head and the control
    tensors (gains, scales, resid_mix, skip weights), which are not matrices in Muon's sense even
    when they are 2-D, and the gate projections (GateLinear), as the records route them. With
    side_matrices "adam" the BigramHash and value-embedding projections join the control tensors in
    Adam (PR #549: small matrices not worth a Muon bank)."""
    head = [model.lm_head.weight] if model.lm_head is not None else []
    embeds = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    side = {id(m.proj.weight) for m in (model.bigram, model.ve) if m is not None and side_matrices == "adam"}
    matrices = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and not isinstance(m, GateLinear)
                and m is not model.lm_head and id(m.weight) not in side]
    taken = {id(p) for p in matrices + embeds + head}
    # requires_grad off: the asymmetric softcaps, which the record's optimizers leave out too
    return {"muon": matrices, "embed": embeds, "head": head,
            "scalar": [p for p in model.parameters() if id(p) not in taken and p.requires_grad]}


def build_optimizers(model: GPT, cfg: dict, rank: int = 0, world: int = 1,
                     ns_dtype: torch.dtype = torch.float32) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon]; Muon runs in parallel (sharded) mode when there is more than one process, and
    its Newton-Schulz iteration in `ns_dtype`."""
    groups = param_groups(model, cfg["side_matrices"])
    wd = cfg["adam_weight_decay"]
    adam_groups = [{"params": groups["embed"], "lr": cfg["embed_lr"], "weight_decay": wd},
                   {"params": groups["scalar"], "lr": cfg["scalar_lr"], "weight_decay": cfg["scalar_weight_decay"]}]
    if groups["head"]:
        adam_groups.append({"params": groups["head"], "lr": cfg["head_lr"], "weight_decay": wd})
    parallel = world > 1 and cfg["parallel_muon"]
    opts = [
        torch.optim.AdamW(adam_groups, betas=(cfg["adam_beta1"], cfg["adam_beta2"]), eps=cfg["adam_eps"]),
        Muon(groups["muon"], lr=cfg["matrix_lr"], momentum=cfg["muon_momentum"], ns_steps=cfg["muon_ns_steps"],
             ns=cfg["muon_ns"], ns_margin=cfg["muon_ns_margin"], row_norm=cfg["muon_row_norm"],
             weight_decay=cfg["muon_weight_decay"],
             rank=rank if parallel else 0, world=world if parallel else 1, ns_dtype=ns_dtype),
    ]
    for opt in opts:
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return opts


def average_gradients(params: list[nn.Parameter], world: int) -> None:
    """One flat all-reduce of the given gradients: the mean over processes."""
    if world == 1 or not params:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sync_and_clip(model: nn.Module, muon: Muon, world: int, clip: float, scope: str = "global") -> float:
    """Average the gradients over processes (Muon's own reduce-scatter in parallel mode) and clip their
    norm to `clip` when it is set: the averaged gradient's norm (scope global), or each process's own
    gradient before averaging (scope local, as PR #549 does). Returns the norm before clipping (0
    when not clipping)."""
    for p in model.parameters():  # e.g. a looped block's own controls before the loop switches on
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    local_norm = 0.0
    if clip > 0 and scope == "local":
        local_norm, clip = float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)), 0.0
    banked = {id(p) for bank in muon.banks for p in bank} if muon.parallel else set()
    replicated = [p for p in model.parameters() if id(p) not in banked]
    average_gradients(replicated, world)
    sumsq = muon.reduce_grads() if muon.parallel else None
    if clip <= 0:
        return local_norm
    total = sum(p.grad.float().square().sum() for p in replicated)
    if sumsq is not None:  # each process holds a different shard of the banked gradients
        dist.all_reduce(sumsq)
        total = total + sumsq
    norm = float(total.sqrt())
    c = min(1.0, clip / (norm + 1e-6))
    if c < 1.0:
        for p in replicated:
            p.grad.mul_(c)
        if muon.parallel:
            muon.scale_grads(c)
    return norm


def read_shard_order(path: Path | None, cfg: dict) -> list[int] | None:
    """The shard order of loader mode `ordered`: as given in the config, or hardest/easiest first
    from `pgolf shard-order`'s shard_order.json."""
    if cfg["mode"] != "ordered":
        return None
    if cfg["order"] == "given":
        return list(cfg["shard_order"])
    if path is None:
        raise PgolfError(f"loader.order {cfg['order']!r} needs --shard-order (shard_order.json)")
    key = f"{cfg['order']}_first"
    order = read_result(path).get(key)  # checksummed: an edited order would train another model
    if not (isinstance(order, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in order)):
        raise PgolfError(f"{path}: {key} must be a list of shard indices, got {order!r}")
    return order


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class TrainJob:
    """One training run: its validated config sections, the paths its rule declares, its seed.

    `data` None means no dataset: the batches come from the Trainer's `batches` (the bench). `out_dir`
    None writes no outputs, and `ckpt_dir` None keeps no checkpoints (no lock, no resume, no train.log):
    a run that only measures, like the bench, leaves nothing behind."""

    model_cfg: dict
    train_cfg: dict
    loader_cfg: dict
    data: Path | None
    vocab_size: int
    seed: int
    device: str
    precision: str
    out_dir: Path | None
    ckpt_dir: Path | None
    shard_order: Path | None  # pgolf shard-order's shard_order.json, for loader order hardest/easiest


if TYPE_CHECKING:  # types only: the packed submission leaves them out
    from collections.abc import Callable
    from typing import Protocol

    class Batches(Protocol):
        def next_batch(self, seqs: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    # (rank, device) -> this process's batches, in place of the job's dataset (the bench's random tokens)
    BatchSource = Callable[[int, torch.device], Batches]


class Trainer:
    def __init__(self, job: TrainJob, batches: BatchSource | None = None) -> None:
        self.job, self.cfg, self.model_cfg = job, job.train_cfg, job.model_cfg
        # one trainer per seed folder; a run without checkpoints has no folder to guard
        self.lock = lock_seed(job.ckpt_dir) if job.ckpt_dir is not None else None
        self.rank, self.world, self.device = setup_distributed(job.device)
        self.accum = grad_accum_steps(self.cfg, self.world)
        self.micro_seqs = self.cfg["batch_tokens"] // self.cfg["seq_len"] // (self.world * self.accum)
        torch.manual_seed(job.seed)
        self.model = GPT(job.vocab_size, self.model_cfg).to(self.device)
        self.precision = job.precision
        ns_dtype = torch.bfloat16 if bf16(self.device, self.precision) else torch.float32
        self.opts = build_optimizers(self.model, self.cfg, self.rank, self.world, ns_dtype)
        self.ema = EMA(self.model, self.cfg["ema_decay"], self.cfg["ema_warmup"])
        self.swa = SWA(self.cfg["swa_every"], self.cfg["swa_below"]) if self.cfg["swa"] else None
        self.forward = compiled(self.model, self.cfg["compile"], self.device)
        self.shard_order = None  # a list of shard indices once make_loader reads the loader section
        self.loader = self.make_loader() if batches is None else batches(self.rank, self.device)
        self.step, self.elapsed, self.rows, self.qat = 0, 0.0, [], False
        self.fp = self.fingerprint() if job.ckpt_dir is not None else ""
        self.prime_seconds = 0.0

    def fingerprint(self) -> str:
        # the data order is part of what a checkpoint must match, like the configs. The loader section
        # enters as the canonical JSON text the rules pass (sort_keys), as it did when the trainer kept
        # the command line's string: checkpoints written before still resume.
        loader = json.dumps(self.job.loader_cfg, sort_keys=True)
        stream = {**self.cfg, "loader": loader, "shard_order": self.shard_order, "precision": self.precision}
        return checkpoint.fingerprint(self.model_cfg, stream, self.job.seed, self.job.vocab_size, self.job.data)

    def make_loader(self) -> DistributedLoader:
        job = self.job
        if job.data is None:
            raise PgolfError("training needs a dataset folder (data) or a batch source")
        # the model's vocabulary must be the shards' (the manifest), and every id below it
        open_dataset(job.data, job.vocab_size, "--vocab-size (tokenizer.vocab_size)")
        self.shard_order = read_shard_order(job.shard_order, job.loader_cfg)
        return DistributedLoader(job.data, self.rank, self.world, self.device, job.loader_cfg, self.cfg["seq_len"],
                                 job.seed, self.shard_order, job.vocab_size)

    def resume(self) -> None:
        if self.job.ckpt_dir is None:
            return
        state = checkpoint.load(self.job.ckpt_dir, self.fp)
        if state is None:
            return
        self.load_state(state)
        self.log(f"resumed from {self.job.ckpt_dir} at step {self.step}")

    def state(self) -> dict:
        """Everything a training step changes (RNG aside): what a checkpoint holds and priming restores.
        Every process must call it: Parallel Muon gathers its shards."""
        return {"model": self.model.state_dict(), "ema": self.ema.shadow,
                "swa": self.swa.state() if self.swa is not None else None,
                "optimizers": [o.state_dict() for o in self.opts], "loader": self.loader.stream.state(),
                "step": self.step, "elapsed": self.elapsed, "rows": self.rows}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for opt, s in zip(self.opts, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        self.ema.shadow = state["ema"]
        if self.swa is not None:
            self.swa.load_state(state["swa"])
        self.loader.stream.load_state(state["loader"])
        self.step, self.elapsed, self.rows = state["step"], state["elapsed"], state["rows"]

    def save_checkpoint(self) -> None:
        if self.job.ckpt_dir is None:  # the same on every process: none waits at the barrier alone
            return
        state = self.state()
        if self.rank == 0:
            checkpoint.save(self.job.ckpt_dir, {"fingerprint": self.fp, **state})
        if self.world > 1:
            dist.barrier()

    def prime(self) -> None:
        """The records' compile warm-up, outside the clock: `prime_steps` real steps in each
        recurrence phase the run will pass through (each is its own compiled graph; late QAT is a
        tensor switch and needs none), then every piece of state restored, so the timed run is
        step for step the run without priming."""
        n = self.cfg["prime_steps"]
        if n == 0 or self.step >= self.cfg["iterations"]:
            return
        t0 = time.perf_counter()
        saved, rng, recur = copy.deepcopy(self.state()), checkpoint.rng_state(), self.model.recur_active
        phases = [False, True] if self.model_cfg["recur_layers"] else [recur]
        for phase in phases:  # as the records do: n steps without the loop, n with it
            self.model.recur_active = phase
            for _ in range(n):
                self.optimize(lr_scale(self.cfg, self.step, self.elapsed))
        self.sync()
        self.load_state(saved)
        checkpoint.set_rng_state(rng)
        self.model.recur_active = recur
        self.prime_seconds = time.perf_counter() - t0
        self.log(f"primed {n * len(phases)} steps (compile and warm-up) in {self.prime_seconds:.1f}s, outside the "
                 "training clock; state restored")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def log(self, msg: str) -> None:
        """To the stage's log, and appended to ckpt/train.log: Snakemake deletes a job's log before a
        retry, and the attempt a scheduler cancelled should stay readable beside the one that resumed."""
        if self.rank != 0:
            return
        print(msg, flush=True)
        if self.job.ckpt_dir is not None:
            self.job.ckpt_dir.mkdir(parents=True, exist_ok=True)
            with open(self.job.ckpt_dir / "train.log", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def train_step(self) -> float:
        scale = lr_scale(self.cfg, self.step, self.elapsed)
        self.set_phase(scale)
        return self.optimize(scale).item()

    def optimize(self, scale: float) -> torch.Tensor:
        """One optimizer step at LR scale `scale`: the mean loss over the global batch, on the device."""
        cfg = self.cfg
        for opt in self.opts:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
        self.opts[1].param_groups[0]["momentum"] = muon_momentum(cfg, self.step)
        total = torch.zeros((), device=self.device)
        for _ in range(self.accum):
            x, y = self.loader.next_batch(self.micro_seqs, cfg["seq_len"])
            with autocast(self.device, self.precision):
                loss = token_losses(self.forward, x, y).mean()
            (loss / self.accum).backward()
            total += loss.detach() / self.accum
        sync_and_clip(self.model, self.opts[1], self.world, cfg["grad_clip"], cfg["clip_scope"])
        for opt in self.opts:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        self.ema.update(self.model, self.step)
        if self.swa is not None and self.step >= cfg["warmup_steps"]:
            self.swa.maybe_add(self.model, self.step, scale)
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        return total

    def set_phase(self, scale: float) -> None:
        """Switch depth recurrence and late QAT on when their time comes; log each switch once."""
        recur = bool(self.model_cfg["recur_layers"]) and recurrence_on(self.model_cfg, self.cfg, self.step,
                                                                        self.elapsed)
        if recur != self.model.recur_active and self.model_cfg["recur_layers"]:
            self.model.recur_active = recur
            self.log(f"step {self.step}: depth recurrence {'on' if recur else 'off'}")
        late = self.step >= self.cfg["warmup_steps"]  # the warmup's low LR is not the end of training
        qat = late and 0 < scale < self.cfg["qat_below"]
        if qat != self.qat:
            self.model.set_qat(qat)
            self.qat = qat
            self.log(f"step {self.step}: late QAT {'on' if qat else 'off'} (int{self.model_cfg['qat_bits']})")

    def preempted(self) -> bool:
        """True once any process got SIGTERM (a scheduler's preemption); agreed on by all processes."""
        flag = torch.tensor(float(self.sigterm), device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def out_of_time(self) -> bool:
        budget = self.cfg["max_wallclock_seconds"]
        return budget > 0 and self.elapsed >= budget

    def run(self, stop_after_step: int = 0) -> None:
        """Resume, train to the end (or the time budget), write the outputs. `stop_after_step` is the
        tests' kill: the process dies abruptly after that step."""
        self.sigterm = False
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "sigterm", True))
        self.resume()
        cfg, n = self.cfg, self.cfg["iterations"]
        self.log(f"training {sum(p.numel() for p in self.model.parameters()):,} parameters on {self.device} "
                 f"x{self.world} ({self.precision} precision), grad accum {self.accum}, "
                 f"{cfg['batch_tokens']:,} tokens/step")
        self.prime()
        while self.step < n and not self.out_of_time():
            t0 = time.perf_counter()
            loss = self.train_step()
            dt = time.perf_counter() - t0
            if not math.isfinite(loss):  # the loss is on the host already: checking it costs no sync
                raise Diverged(f"{self.job.out_dir}: loss became non-finite ({loss}) at step {self.step + 1}; "
                               "no outputs written (lower the learning rates or raise train.grad_clip)")
            self.elapsed += dt
            self.step += 1
            self.record(loss, dt)
            if self.step % cfg["checkpoint_every"] == 0 or self.step == n:
                self.save_checkpoint()
            if stop_after_step and self.step >= stop_after_step:
                os._exit(3)  # test hook: die abruptly, as a killed job would
            if self.preempted():
                self.save_checkpoint()
                self.log(f"SIGTERM: checkpoint written at step {self.step}; run again to resume")
                raise SystemExit(143)
        self.finish()

    def record(self, loss: float, dt: float) -> None:
        tps = self.cfg["batch_tokens"] / dt
        self.rows.append({"step": self.step, "loss": loss, "lr_scale": lr_scale(self.cfg, self.step - 1, self.elapsed),
                          "tokens": self.step * self.cfg["batch_tokens"], "elapsed_s": self.elapsed,
                          "tokens_per_s": tps})
        if self.step % self.cfg["log_every"] == 0 or self.step == 1:
            n = self.cfg["iterations"]
            eta = self.elapsed / self.step * (n - self.step)
            if self.cfg["max_wallclock_seconds"] > 0:
                eta = min(eta, self.cfg["max_wallclock_seconds"] - self.elapsed)
            self.log(f"step {self.step}/{n} loss {loss:.4f} tok/s {tps:,.0f} elapsed {self.elapsed:.1f}s "
                     f"eta {max(eta, 0):.1f}s mem {memory_mb(self.device):.0f}MB")

    def finish(self) -> None:
        if self.rank == 0 and self.job.out_dir is not None:
            self.write_outputs(self.job.out_dir)
        teardown(self.world)

    def write_outputs(self, out: Path) -> None:
        meta = {**self.model.meta(), "step": self.step, "seed": self.job.seed}
        export, source = self.ema.shadow, "ema"
        if self.swa is not None and self.swa.count:
            export, source = self.swa.average(), f"swa over {self.swa.count} snapshots"
        elif self.swa is not None:
            self.log("swa: no snapshot was taken (the LR scale never fell below swa_below); exporting the EMA")
        tensorfile.save(out / "ema.pgt", export, {**meta, "weights": source})
        tensorfile.save(out / "raw.pgt", {k: v.float() for k, v in self.model.state_dict().items()}, meta)
        write_parquet(out / "metrics.parquet", pa.Table.from_pylist(self.rows))
        tokens = self.step * self.cfg["batch_tokens"]
        write_result(out / "train.json", {
            "steps": self.step, "tokens": tokens, "train_seconds": self.elapsed,
            "tokens_per_s": tokens / max(self.elapsed, 1e-9), "final_loss": self.rows[-1]["loss"],
            "prime_seconds": self.prime_seconds, "precision": self.precision,
            "parameters": sum(p.numel() for p in self.model.parameters()), "world_size": self.world,
            "grad_accum": self.accum, "device": str(self.device), "peak_memory_mb": memory_mb(self.device),
            "exported_weights": source})
        self.log(f"done: {self.step} steps, {tokens:,} tokens in {self.elapsed:.1f}s")


def train(job: TrainJob, stop_after_step: int = 0) -> None:
    """`pgolf train`'s entry: one seed, resumed from its last checkpoint when there is one."""
    Trainer(job).run(stop_after_step)


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf train", description=__doc__)
    ap.add_argument("--data", required=True, help="dataset folder with fineweb_train_*.bin")
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--model-cfg", required=True, help="the model config section as JSON")
    ap.add_argument("--cfg", required=True, help="the train config section as JSON")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default="auto", choices=PRECISIONS, help="autocast: bf16, fp32, auto (bf16 on CUDA)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--ckpt-dir", required=True, help="resume checkpoints; keep it outside Snakemake's outputs")
    ap.add_argument("--loader-cfg", required=True, help="the loader config section as JSON")
    ap.add_argument("--shard-order", default="", help="shard_order.json, for loader mode ordered (hardest/easiest)")
    ap.add_argument("--stop-after-step", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    loader = json.loads(a.loader_cfg)
    job = TrainJob(model_cfg=json.loads(a.model_cfg), train_cfg=json.loads(a.cfg), loader_cfg=loader,
                   data=Path(a.data), vocab_size=a.vocab_size, seed=a.seed, device=a.device, precision=a.precision,
                   out_dir=Path(a.out_dir), ckpt_dir=Path(a.ckpt_dir),
                   shard_order=Path(a.shard_order) if a.shard_order else None)
    train(job, a.stop_after_step)
