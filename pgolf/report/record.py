"""`pgolf record`: a submission folder in the challenge's format (records/track_10min_16mb/<name>/).

It holds README.md, submission.json, each seed's training log, and the code:
- train_gpt.py, the counted code: pgolf.pipeline.bundle's self-extracting file of the modules that train,
  quantize, compress and evaluate (`python train_gpt.py <stage> ...`); bytes_code is its size, the
  same bytes size.json counts;
- the readable pgolf package those modules come from, with the data stages, and the pipeline
  definition and resolved config that reproduce the whole run from inside the folder. These only
  prepare data and orchestrate, as the challenge's data scripts do, and are not counted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
from importlib import metadata
from pathlib import Path

from pgolf.config import validate
from pgolf.errors import PgolfError
from pgolf.formats import tensorfile
from pgolf.formats.container import file_size
from pgolf.formats.io import atomic_dir, write_bytes, write_json
from pgolf.formats.results import has, integer, number, read_result
from pgolf.pipeline import bundle
from pgolf.pipeline.provenance import PACKAGE, code_files
from pgolf.report import check
from pgolf.report.aggregate import summary_table
from pgolf.report.inputs import add_seed_files, seed_files

PIPELINE_FILES = ("Snakefile", "pyproject.toml", "rules", "schemas", "profiles")


def copy_code(dest: Path) -> int:
    """Write the packed train_gpt.py, copy the package and the pipeline definition into dest; return
    the counted code bytes (train_gpt.py's size)."""
    root = PACKAGE.parent
    write_bytes(dest / bundle.FILE_NAME, bundle.build())
    for src in code_files():
        target = dest / src.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    for name in PIPELINE_FILES:
        src = root / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copyfile(src, dest / name)
    return (dest / bundle.FILE_NAME).stat().st_size


# compare.metric -> the part of eval.json that holds it
METRIC_PART = {"sliding_bpb": "sliding", "ttt_bpb": "ttt", "pre_quant_bpb": "pre_quant", "post_quant_bpb": "post_quant",
               "sliding_ngram_bpb": "sliding_ngram", "ttt_ngram_bpb": "ttt_ngram"}


def artifact_bytes(artifact: Path, size: Path) -> int:
    """The artifact's bytes, from the file itself; its size.json must have measured this very file."""
    n = file_size(artifact, PgolfError)
    measured = integer(read_result(size), ("model_bytes",), size)
    if measured != n:
        raise PgolfError(f"{size}: model_bytes is {measured:,}, but {artifact} is {n:,} bytes: it describes another "
                         "artifact (rerun pgolf size)")
    return n


def seed_results(files: dict[int, dict[str, Path]], metric: str, code_bytes: int) -> dict:
    """Each seed's score, bytes and time from its eval, train and artifact files (bytes from the
    artifact itself, code bytes from the packed file: derived, never copied)."""
    out, part = {}, METRIC_PART[metric]
    for s, f in files.items():
        ev, tr = read_result(f["eval"]), read_result(f["train"])
        model_bytes, steps = artifact_bytes(f["artifact"], f["size"]), integer(tr, ("steps",), f["train"])
        seconds = number(tr, ("train_seconds",), f["train"])
        out[str(s)] = {"val_bpb": number(ev, (part, "val_bpb"), f["eval"]),
                       "val_loss": number(ev, (part, "val_loss"), f["eval"]),
                       "artifact_bytes": model_bytes, "bytes_total": model_bytes + code_bytes,
                       "steps": steps, "train_seconds": seconds, "step_avg_ms": 1000 * seconds / max(steps, 1),
                       "calibration_seconds": calibration_seconds(f.get("hessians"))}
        if has(ev, ("scored_eval_seconds",)):  # an eval.json without it leaves the check no eval time: it fails
            out[str(s)]["eval_seconds"] = number(ev, ("scored_eval_seconds",), f["eval"])
        if has(ev, (part, "tokens")):
            out[str(s)]["val_tokens"] = integer(ev, (part, "tokens"), f["eval"])
    return out


def calibration_seconds(hessians: Path | None) -> float:
    """The calibrate stage's own seconds, as its Hessians file records them (0 without one: round
    to nearest calibrates nothing). The challenge counts GPTQ calibration as training (#1950)."""
    if hessians is None:
        return 0.0
    return number(tensorfile.read_meta(hessians), ("seconds",), hessians)


def seed_log_tail(seed: int, r: dict, code_bytes: int, metric: str) -> str:
    """The lines a challenge record's seed log ends with, from this seed's result files, in the forms
    pgolf check reads (pgolf.report.seedlog): its times, bytes and final score."""
    lines = ["", f"pgolf record: seed {seed}, from its train.json, Hessians, eval.json and artifact",
             f"train_time:{1000 * r['train_seconds']:.0f}ms step:{r['steps']}/{r['steps']}",
             f"calibration_time:{1000 * r['calibration_seconds']:.0f}ms"]
    if "eval_seconds" in r:
        lines.append(f"total_eval_time:{r['eval_seconds']:.3f}s")
    if "val_tokens" in r:
        lines.append(f"val_tokens: {r['val_tokens']}")
    label = f"pgolf_final_{metric.removesuffix('_bpb')}_exact"
    lines += [f"Serialized model pgolf: {r['artifact_bytes']} bytes", f"Code size: {code_bytes} bytes",
              f"Total submission size pgolf: {r['bytes_total']} bytes",
              f"{label} val_loss:{r['val_loss']:.8f} val_bpb:{r['val_bpb']:.8f}"]
    return "\n".join(lines) + "\n"


def summary_numbers(summary: dict, metric: str, source: Path) -> dict:
    """The summary.json numbers a submission quotes, each checked: a number, and finite."""
    out = {"val_bpb": number(summary, ("mean", metric), source),
           "val_bpb_std": number(summary, ("std", metric), source)}
    if "compare" in summary:
        for key, field in (("t_statistic", "welch_t"), ("welch_df", "welch_df"), ("p_value", "p_value")):
            out[key] = number(summary, ("compare", field), source)
    return out


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("pgolf", "torch", "numpy", "sentencepiece", "zstandard", "snakemake"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def submission(cfg: dict, numbers: dict, results: dict, code_bytes: int) -> dict:
    metric, rec = cfg["compare"]["metric"], cfg["record"]
    sub = {
        "name": rec["name"], "author": rec["author"], "github_id": rec["github_id"], "blurb": rec["blurb"],
        "date": dt.date.today().isoformat(), "track": rec["track"], "metric": metric,
        "val_bpb": numbers["val_bpb"], "val_bpb_std": numbers["val_bpb_std"],
        "val_loss": sum(r["val_loss"] for r in results.values()) / len(results),
        "seeds": [int(s) for s in results], "seed_results": results,
        "bytes_total": max(r["bytes_total"] for r in results.values()), "bytes_code": code_bytes,
        "hardware": rec["hardware"], "versions": versions(), "pytorch_version": versions()["torch"],
    }
    sub.update({k: v for k, v in numbers.items() if k not in ("val_bpb", "val_bpb_std")})
    return sub


# Keys that size or schedule a run rather than switch a technique on; the techniques list skips them.
SIZE_KEYS = {"num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "activation", "skip",
             "tie_embeddings", "logit_softcap"}
RUN_KEYS = {"nproc", "seq_len", "batch_tokens", "micro_batch_seqs", "iterations", "checkpoint_every", "log_every",
            "matrix_lr", "muon_momentum", "muon_ns", "ema_decay"}


def changed(cfg: dict, section: str, skip: set[str]) -> str:
    """`key=value` for every key of the section that differs from its schema default."""
    defaults = validate({})[section]
    return ", ".join(f"{k}={v}" for k, v in cfg[section].items() if k not in skip and defaults.get(k) != v)


def clip_text(quant: dict) -> str:
    clip = quant["clip"]
    return clip if isinstance(clip, str) else ", ".join(f"{g} {c}" for g, c in clip.items())


def readme(cfg: dict, sub: dict, table: str, audit: str) -> str:
    m, t, q = cfg["model"], cfg["train"], cfg["quant"]
    techniques = [
        f"GPT {m['num_layers']}x{m['model_dim']}, {m['num_heads']} heads / {m['num_kv_heads']} KV heads (GQA), "
        f"{m['activation']} MLP x{m['mlp_mult']}, {m['skip']} skips, "
        f"{'tied' if m['tie_embeddings'] else 'untied'} embeddings, logit softcap {m['logit_softcap']}",
        f"Muon (lr {t['matrix_lr']}, momentum {t['muon_momentum']}, {t['muon_ns']} Newton-Schulz) + AdamW; "
        f"EMA {t['ema_decay']}",
        "model keys off their defaults: " + (changed(cfg, "model", SIZE_KEYS) or "none (the baseline architecture)"),
        "training keys off their defaults: " + (changed(cfg, "train", RUN_KEYS) or "none"),
        f"{t['iterations']} steps of {t['batch_tokens']:,} tokens at seq {t['seq_len']}",
        f"{q['method']} per-row quantization ({', '.join(f'{g} int{b}' for g, b in q['bits'].items())}; "
        f"{clip_text(q)} clip), "
        f"{cfg['compress']['codec']} level {cfg['compress']['level']}",
    ]
    return "\n".join([
        f"# {sub['name']}", "", sub["blurb"] or "Trained with pgolf.", "",
        f"**val_bpb {sub['val_bpb']:.4f}** ({sub['metric']}, mean of {len(sub['seeds'])} seeds, "
        f"std {sub['val_bpb_std']:.4f}); at most {sub['bytes_total']:,} bytes "
        f"(code {sub['bytes_code']:,}: `{bundle.FILE_NAME}`, the packed training, quantization and evaluation "
        "code; `pgolf/` here is its readable source).", "",
        table, "## pgolf check", "", audit, "## Techniques", "", *[f"- {x}" for x in techniques], "",
        "## Reproduce", "", "From inside this folder:", "", "```bash",
        "pip install torch==2.13.0 && pip install -e . && snakemake --cores all --configfile config.yaml",
        "```", "", f"or stage by stage with the counted file: `python {bundle.FILE_NAME} train|calibrate|quantize|"
        f"compress|evaluate ...` (`torchrun ... {bundle.FILE_NAME} train ...` on several GPUs).", "",
        "`config.yaml` is the resolved config of the run; `Snakefile`, `rules/` and `schemas/` only",
        "orchestrate and are not counted as code.", ""])


def summary_text(summary: dict, source: Path) -> str:
    """The run's table for the README, rendered from the checked summary.json as aggregate renders
    summary.md: derived, so that an edited summary.md cannot reach the record."""
    try:
        return summary_table(summary)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise PgolfError(f"{source}: not a summary aggregate wrote ({type(e).__name__}: {e})") from None


def build(summary: Path, files: dict[int, dict[str, Path]], cfg: dict, out: Path, data: Path | None = None) -> dict:
    """The record folder from the run's summary and each seed's files (eval, size, train, artifact,
    log, and hessians when GPTQ calibrated), then `pgolf check` on it (with the dataset folder
    `data`, when given): its table goes into the README, and a failed check fails the stage
    (record.check: enforce) or is only reported there (report)."""
    metric = cfg["compare"]["metric"]
    summary_obj = read_result(summary)
    numbers = summary_numbers(summary_obj, metric, summary)
    text = summary_text(summary_obj, summary)
    with atomic_dir(out) as staging:
        code_bytes = copy_code(staging)
        results = seed_results(files, metric, code_bytes)
        sub = submission(cfg, numbers, results, code_bytes)
        write_json(staging / "submission.json", sub)
        write_bytes(staging / "config.yaml", json.dumps(cfg, indent=2).encode())  # JSON is valid YAML
        for s, f in files.items():
            tail = seed_log_tail(s, results[str(s)], code_bytes, metric)
            write_bytes(staging / f"train_seed{s}.log", f["log"].read_bytes() + tail.encode())
        # No predecessor: a preset's compare baseline is often the record it reproduces, and summary.md
        # already compares against it; whether this beats a record is `pgolf check --predecessor`'s question.
        checks = check.run_checks(staging, data, bos=cfg["model"]["bos_id"])
        audit = check.table(checks)
        print(audit, flush=True)
        write_bytes(staging / "README.md", readme(cfg, sub, text, audit).encode())
        failed = check.failed(checks)
        if failed and cfg["record"]["check"] == "enforce":
            reasons = "; ".join(r for c in failed for r in c.reasons)
            raise PgolfError(f"{out}: pgolf check failed ({', '.join(c.name for c in failed)}): {reasons}")
    print(f"{out}: val_bpb {sub['val_bpb']:.4f}, bytes_total {sub['bytes_total']:,}", flush=True)
    return sub


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf record", description=__doc__)
    ap.add_argument("--summary", type=Path, required=True, help="the run's summary.json")
    add_seed_files(ap, "eval", "size", "train", "artifact", "log")
    ap.add_argument("--hessians", type=Path, nargs="+",
                    help="each seed's Hessians (quant.method gptq): the calibrate stage's seconds count as training")
    ap.add_argument("--data", type=Path, help="the dataset folder: pgolf check's canonical-val and overlap checks")
    ap.add_argument("--config", required=True, help="the whole resolved config as JSON")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    extra = {"hessians": args.hessians} if args.hessians else {}
    files = seed_files(args.seeds, eval=args.eval, size=args.size, train=args.train, artifact=args.artifact,
                       log=args.log, **extra)
    build(args.summary, files, json.loads(args.config), args.out, args.data)
