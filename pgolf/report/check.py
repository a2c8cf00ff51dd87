"""`pgolf check <folder>`: audit a record folder as the challenge's maintainers do, pgolf's or anyone's.

One table, a row per check with its evidence, a one-line reason per failure naming the file, exit
status 1 when any check fails. The checks (parameter-golf's rules and what the audit of May 2026,
PR #2146, excluded or re-ran records for):
1. bytes: train_gpt.py (the counted code) plus each seed's compressed model, at most 16,000,000
   decimal bytes; every claim of it in submission.json and the seed logs set against that count.
2. time: each seed's training plus GPTQ calibration within 600 s (#1950), its evaluation within 600 s.
3. seeds: at least three seed logs, each with a final score; submission.json's per-seed scores, mean
   and std recomputed from them (#2009, #2071).
4. significance against a predecessor (its folder, or its seeds' scores): the gain in nats per token
   and one-sided Welch p, against the rules' level (0.005 nats at p < 0.01) and practice's (p < 0.25).
5. data: the val split is the canonical one for its tokenizer (#2109), from the logs' val token
   count and, given --data, the dataset folder itself; and no val document lies in the train shards
   (#2130), fingerprinted BOS to BOS over every shard.
6. score-first, for pgolf's folders: pgolf audit's perturbation check (every loss recorded up to a
   target t unchanged when the tokens after t change) for the sliding evaluation and each TTT mode,
   on the folder's model config with random weights: the order is a property of the code.
The check reads only the folder (and --data, --predecessor); it runs no code of the folder's own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from pgolf.errors import PgolfError
from pgolf.report import seedlog, stats
from pgolf.report.seedlog import SeedLog

CAP_BYTES = 16_000_000
TRAIN_LIMIT_S = 600.0
EVAL_LIMIT_S = 600.0
MIN_SEEDS = 3
NATS_BAR, P_RULES, P_PRACTICE = 0.005, 0.01, 0.25
CODE_FILE = "train_gpt.py"
PIN_SEQ = 2048  # the records' logs print val_tokens as (tokens - 1) // 2048 * 2048
# Val target tokens of the challenge's exports (PIN_SEQ multiples): sp1024 and the CaseOps export as
# PR #2146's audit checked them, sp8192 as all 30 merged sp8192 logs show. sp4096 is not pinned: its two
# merged records log 45,514,752 and 45,508,608. No export's val shard sha256 is published, so none is
# pinned: the check reports the one it reads.
CANONICAL_VAL_TOKENS = {
    "sp1024": 62_021_632,
    "sp8192": 40_540_160,
    "sp8192_lossless_caps_caseops_v1_reserved": 47_851_520,
}
PASS, FAIL, SKIP = "pass", "FAIL", "not checked"


@dataclass
class Check:
    name: str
    status: str
    evidence: str
    reasons: list[str] = field(default_factory=list)


def verdict(name: str, evidence: str, reasons: list[str]) -> Check:
    return Check(name, FAIL if reasons else PASS, evidence, reasons)


class Num(float):
    """A JSON number that remembers how many decimals it was written with (its precision)."""

    digits: int = 0


def _num(text: str) -> Num:
    n = Num(text)
    n.digits = max(0, -int(Decimal(text).as_tuple().exponent))
    return n


def places(x: float) -> int:
    return x.digits if isinstance(x, Num) else 12


def half_unit(d: int) -> float:
    return 0.5 * 10.0 ** -d


# ---------------------------------------------------------------- the folder


@dataclass
class Folder:
    path: Path
    submission: dict | None
    submission_name: str
    problem: str  # why submission.json could not be read ("" when it could)
    seeds: list[int]
    logs: dict[int, SeedLog]  # the log chosen for each seed
    missing: dict[int, str]  # seed -> why it has no log
    config: dict | str | None  # pgolf's resolved config.yaml, when the folder is pgolf's (str: why it is unreadable)


def read_submission(folder: Path) -> tuple[dict | None, str, str]:
    found = sorted(folder.glob("submission*.json"))
    path = found[0] if found else folder / "submission.json"
    try:
        obj = json.loads(path.read_text(), parse_float=_num)
    except FileNotFoundError:
        return None, path.name, f"{path.name}: missing"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, path.name, f"{path.name}: not valid JSON ({e})"
    if not isinstance(obj, dict):
        return None, path.name, f"{path.name}: not a JSON object"
    return obj, path.name, ""


def claimed_seeds(sub: dict | None) -> list[int]:
    if not sub:
        return []
    raw = sub.get("seeds") or list((sub.get("seed_results") or {}).keys())
    out = []
    for s in raw if isinstance(raw, list) else []:
        try:
            out.append(int(s))
        except (TypeError, ValueError):
            continue
    return out


def seed_claim(sub: dict | None, seed: int, key: str) -> float | None:
    results = (sub or {}).get("seed_results") or {}
    value = (results.get(str(seed)) or {}).get(key) if isinstance(results, dict) else None
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def read_config(folder: Path) -> dict | str | None:
    """pgolf's resolved config (JSON in config.yaml), when the folder is one pgolf record wrote; a
    problem (str) when its config.yaml is JSON, as pgolf writes it, but damaged: that is a failure,
    not a folder of another kind, or a damaged config would skip its score-first check."""
    try:
        text = (folder / "config.yaml").read_text()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        text = "{?"
    if not text.lstrip().startswith("{"):
        return None  # a YAML file of another tool
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        return f"config.yaml: damaged ({e})"
    if not (isinstance(cfg, dict) and {"model", "eval", "tokenizer"} <= set(cfg)):
        return "config.yaml: not a pgolf config (no model, eval and tokenizer sections)"
    return cfg


def choose(logs: list[SeedLog], claim: float | None) -> SeedLog:
    """Of several logs for one seed (an original and a rerun), the one holding the claimed score."""
    for log in logs:
        seedlog.pick(log, claim, agrees)
    for log in reversed(logs):
        if claim is not None and log.score is not None and agrees(claim, log.score.bpb, log.score.digits):
            return log
    return logs[-1]


def agrees(claim: float, value: float, digits: int, spread: float = 1.0) -> bool:
    """A claim agrees with a value from the logs to its own last printed digit (a record may round
    after averaging rounded scores), the logs' values being known to half of their last digit, times
    `spread` for a statistic that moves more than its inputs (a std of n: sqrt(n / (n - 1)))."""
    return abs(claim - value) <= 10.0 ** -places(claim) + spread * half_unit(digits) + 1e-12


def load_folder(path: Path) -> Folder:
    if not path.is_dir():
        raise PgolfError(f"{path}: not a folder")
    sub, name, problem = read_submission(path)
    by_seed: dict[int, list[SeedLog]] = {}
    for p in seedlog.candidates(path):
        log = seedlog.read(p)
        if log.seed is not None and (log.score is not None or p.suffix == ".log"):
            log.path = p.relative_to(path)
            by_seed.setdefault(log.seed, []).append(log)
    seeds = claimed_seeds(sub) or sorted(by_seed)
    logs, missing = {}, {}
    for s in seeds:
        if s in by_seed:
            chosen = choose(by_seed[s], seed_claim(sub, s, "val_bpb"))
            logs[s] = seedlog.merge(chosen, [x for x in reversed(by_seed[s]) if x is not chosen])
        else:
            missing[s] = f"train_seed{s}.log: missing: {name} claims seed {s} and no log in the folder is its"
    return Folder(path, sub, name, problem, seeds, logs, missing, read_config(path))


# ---------------------------------------------------------------- 1. bytes


WRAPPER = "# coding: latin-1\nimport brotli\nexec(brotli.decompress('{data}'.encode('latin1')))\n"


def wrapped_bytes(source: bytes) -> int:
    """The size of a self-extracting file that runs `source` (brotli-11 in a latin-1 literal, as
    pgolf's own train_gpt.py): code any competitor could ship in place of the readable file."""
    import brotli

    from pgolf.pipeline.bundle import literal

    return len(WRAPPER.replace("{data}", literal(brotli.compress(source, quality=11, lgwin=24))).encode("latin-1"))


def counted_code(folder: Path) -> tuple[int | None, bool, str]:
    """(counted code bytes, whether that is the file's own size, evidence). A readable train_gpt.py
    counts as the smaller self-extracting file of it, as records since PR #1530 count their code."""
    path = folder / CODE_FILE
    if not path.is_file():
        return None, False, ""
    source = path.read_bytes()
    raw, wrapped = len(source), wrapped_bytes(source)
    if wrapped < raw:
        return wrapped, False, f"{CODE_FILE} {raw:,} B, {wrapped:,} B as a self-extracting brotli file (counted)"
    return raw, True, f"{CODE_FILE} {raw:,} B"


def model_bytes(log: SeedLog) -> tuple[int | None, str]:
    if log.model_bytes is not None:
        return log.model_bytes, "Serialized model"
    code = log.code_bytes.get("compressed", log.code_bytes.get("plain"))
    if log.total_bytes is not None and code is not None:
        return log.total_bytes - code, "its total minus its code"
    return None, ""


def check_bytes(f: Folder) -> Check:
    code, exact, code_text = counted_code(f.path)
    if code is None:
        return verdict("bytes", "no counted code", [f"{CODE_FILE}: missing: the counted code lives there"])
    reasons, totals, claims = [], {}, []
    for s, log in f.logs.items():
        model, _ = model_bytes(log)
        if model is None:
            reasons.append(f"{log.path}: no model size (`Serialized model <codec>: N bytes` or a total and code "
                           "size): a log format pgolf check does not read")
            continue
        totals[s] = code + model
        claim = log.total_bytes
        if claim is not None:
            claims.append(claim)
        if totals[s] > CAP_BYTES:
            said = f"; the log claims {claim:,}" if claim is not None else ""
            reasons.append(f"{log.path}: {CODE_FILE} ({code:,}) plus the model it reports ({model:,}) is "
                           f"{totals[s]:,} bytes, over the {CAP_BYTES:,}-byte cap{said}")
        elif claim is not None and claim > CAP_BYTES:
            reasons.append(f"{log.path}: reports {claim:,} bytes in all, over the {CAP_BYTES:,}-byte cap")
    reasons += submission_byte_claims(f, code, exact, totals, claims)
    if not totals and not reasons:
        reasons.append(f"{f.path.name}: no seed log to take the model's bytes from")
    evidence = code_text
    if totals:
        evidence += (f"; code plus model {min(totals.values()):,}-{max(totals.values()):,} B over {len(totals)} "
                     f"seed logs (cap {CAP_BYTES:,})")
    if claims:
        evidence += f"; the logs claim at most {max(claims):,}"
    total = (f.submission or {}).get("bytes_total")
    if isinstance(total, int):
        # a claim below what the logs show is no failure while everything fits: old records quote one seed's size
        evidence += f"; {f.submission_name} bytes_total {total:,}"
    return verdict("bytes", evidence, reasons)


def submission_byte_claims(f: Folder, code: int, exact: bool, totals: dict[int, int],
                           claims: list[int]) -> list[str]:
    sub, name, reasons = f.submission or {}, f.submission_name, []
    total = sub.get("bytes_total")
    if isinstance(total, int | float) and not isinstance(total, bool):
        if total > CAP_BYTES:
            reasons.append(f"{name}: bytes_total {total:,} is over the {CAP_BYTES:,}-byte cap")
        if totals and max(totals.values()) > CAP_BYTES >= total:
            reasons.append(f"{name}: bytes_total {total:,} is under the cap, but the folder counts "
                           f"{max(totals.values()):,} bytes")
    code_claim = sub.get("bytes_code")
    if isinstance(code_claim, int) and exact and code_claim != code:
        reasons.append(f"{name}: bytes_code {code_claim:,}, but {CODE_FILE} is {code:,} bytes")
    return reasons


# ---------------------------------------------------------------- 2. time


def check_time(f: Folder) -> Check:
    reasons, train, evals = [], {}, {}
    for s, log in f.logs.items():
        if log.train_s is None and log.train_plus_calibration_s is None:
            reasons.append(f"{log.path}: no training time (`train_time:<n>ms` or `train_time: <x>m`): a log "
                           "format pgolf check does not read")
        else:
            spent = max((log.train_s or 0.0) + log.calibration_s, log.train_plus_calibration_s or 0.0)
            train[s] = spent
            if spent > TRAIN_LIMIT_S:
                reasons.append(f"{log.path}: training {log.train_s or 0:.3f} s + GPTQ calibration "
                               f"{log.calibration_s:.3f} s = {spent:.3f} s, over {TRAIN_LIMIT_S:.0f} s")
        if log.eval_s is None:
            reasons.append(f"{log.path}: no evaluation time (`total_eval_time:<x>s`, or `eval_time:<n>ms` on the "
                           "final score line)")
        else:
            evals[s] = log.eval_s
            if log.eval_s > EVAL_LIMIT_S:
                reasons.append(f"{log.path}: evaluation {log.eval_s:.1f} s ({log.eval_source}), over "
                               f"{EVAL_LIMIT_S:.0f} s")
    if not f.logs:
        reasons.append(f"{f.path.name}: no seed log to read times from")
    parts = []
    if train:
        s = max(train, key=train.get)
        log = f.logs[s]
        calib = (f"{log.calibration_s:.1f} s calibration" if log.calibration_lines
                 else "no calibration line")
        parts.append(f"training + calibration at most {train[s]:.1f} s (seed {s}: {calib})")
    if evals:
        s = max(evals, key=evals.get)
        parts.append(f"evaluation at most {evals[s]:.1f} s (seed {s}, {f.logs[s].eval_source})")
    return verdict("time", "; ".join(parts) or "no times", reasons)


# ---------------------------------------------------------------- 3. seeds


def check_seeds(f: Folder) -> Check:
    reasons = [f.problem] if f.problem else []
    reasons += list(f.missing.values())
    scored = {}
    for s, log in f.logs.items():
        if log.score is None:
            reasons.append(f"{log.path}: no final score line (`<label> val_loss:<x> val_bpb:<y>`): a log format "
                           "pgolf check does not read")
            continue
        scored[s] = log.score
        claim = seed_claim(f.submission, s, "val_bpb")
        if claim is not None and not agrees(claim, log.score.bpb, log.score.digits):
            reasons.append(f"{f.submission_name}: seed_results.{s}.val_bpb {claim}, but {log.path} ends with "
                           f"{log.score.bpb} ({log.score.label})")
    if len(scored) < MIN_SEEDS:
        names = ", ".join(str(f.logs[s].path) for s in scored) or "none"
        reasons.append(f"{f.path.name}: {len(scored)} seed log(s) with a final score ({names}); at least {MIN_SEEDS}")
    reasons += mean_and_std(f, scored)
    evidence = ", ".join(f"{s}: {sc.bpb} ({f.logs[s].path}, `{sc.label}`)" for s, sc in scored.items())
    if len(scored) >= 2:
        values = [sc.bpb for sc in scored.values()]
        evidence += f"; mean {statistics.fmean(values):.8f}, std {statistics.stdev(values):.8f}"
    return verdict("seeds", evidence or "no scored seed log", reasons)


def mean_and_std(f: Folder, scored: dict[int, seedlog.Score]) -> list[str]:
    sub, name = f.submission or {}, f.submission_name
    if not scored or not sub:
        return []
    values = [sc.bpb for sc in scored.values()]
    digits = min(sc.digits for sc in scored.values())
    reasons = []
    mean = sub.get("val_bpb")
    if not isinstance(mean, int | float):
        reasons.append(f"{name}: no val_bpb to check against the seed logs")
    elif not agrees(mean, statistics.fmean(values), digits):
        reasons.append(f"{name}: val_bpb {mean} is not the mean of the seed logs' final scores, "
                       f"{statistics.fmean(values):.8f}")
    std = sub.get("val_bpb_std")
    if isinstance(std, int | float) and len(values) >= 2:
        both = (statistics.stdev(values), statistics.pstdev(values))  # records use either
        # rounding each score by at most h moves the sample std by at most h * sqrt(n / (n - 1))
        spread = math.sqrt(len(values) / (len(values) - 1))
        if not any(agrees(std, v, digits, spread) for v in both):
            reasons.append(f"{name}: val_bpb_std {std} is neither the sample std ({both[0]:.8f}) nor the "
                           f"population std ({both[1]:.8f}) of the seed logs' final scores")
    return reasons


# ---------------------------------------------------------------- 4. significance


@dataclass
class Baseline:
    mean: float
    std: float
    n: int
    source: str


def baseline_of(folder: Path | None, scores: list[float] | None) -> Baseline | None:
    if scores:
        if len(scores) < 2:
            raise PgolfError("--predecessor-bpb: Welch's test needs at least two seeds' scores")
        return Baseline(statistics.fmean(scores), statistics.stdev(scores), len(scores), "--predecessor-bpb")
    if folder is None:
        return None
    other = load_folder(folder)
    values = [log.score.bpb for log in other.logs.values() if log.score is not None]
    if len(values) < 2:
        raise PgolfError(f"{folder}: the predecessor has {len(values)} seed log(s) with a final score; "
                         "Welch's test needs two")
    return Baseline(statistics.fmean(values), statistics.stdev(values), len(values), str(folder))


def check_significance(f: Folder, base: Baseline | None, level: str) -> Check:
    if base is None:
        return Check("significance", SKIP, "no predecessor given (--predecessor FOLDER or --predecessor-bpb)")
    scored = [log.score for log in f.logs.values() if log.score is not None]
    if len(scored) < 2:
        return verdict("significance", "", [f"{f.path.name}: {len(scored)} scored seed log(s); Welch's test "
                                            "needs two"])
    # BPB to nats per token with the folder's own ratio: val_loss (nats/token) over val_bpb * ln 2
    ratio = statistics.fmean(sc.loss / (sc.bpb * math.log(2)) for sc in scored)  # bytes per token
    tokens = 10**9
    r = stats.compare([sc.bpb for sc in scored], tokens, round(tokens * ratio),
                      {"mean": base.mean, "std": base.std, "n": base.n}, NATS_BAR, P_RULES)
    rules = r["gain_nats"] >= NATS_BAR and r["p_value_vs_bar"] < P_RULES
    practice = r["gain_nats"] > 0 and r["p_value"] < P_PRACTICE
    evidence = (f"gain {r['gain_nats']:+.5f} nats/token ({r['gain_bpb']:+.5f} BPB) over {base.source} "
                f"(mean {base.mean:.5f}, n {base.n}); Welch p {r['p_value']:.3g} (practice, p < {P_PRACTICE}: "
                f"{'yes' if practice else 'no'}); vs the {NATS_BAR} bar p {r['p_value_vs_bar']:.3g} (rules, "
                f"p < {P_RULES}: {'yes' if rules else 'no'})")
    ok = rules if level == "rules" else practice
    reason = (f"{f.submission_name}: {r['gain_nats']:+.5f} nats/token over {base.source} does not reach the "
              f"{level} level ({'0.005 nats at p < 0.01' if level == 'rules' else 'p < 0.25'})")
    return verdict("significance", evidence, [] if ok else [reason])


# ---------------------------------------------------------------- 5. data


def pinned(variant: str | None) -> int | None:
    return CANONICAL_VAL_TOKENS.get(variant or "")


def check_data(f: Folder, data: Path | None, bos: int) -> Check:
    reasons, parts = [], []
    variant = folder_variant(f)
    for log in f.logs.values():
        if log.val_tokens is None:
            continue
        v, want = log.variant or variant, pinned(log.variant or variant)
        if want is not None and log.val_tokens // PIN_SEQ * PIN_SEQ != want:
            reasons.append(f"{log.path}: val_tokens {log.val_tokens:,}, but the {v} export's val split has "
                           f"{want:,} target tokens: not the canonical split")
    counts = sorted({log.val_tokens for log in f.logs.values() if log.val_tokens is not None})
    if counts:
        want = pinned(variant)
        where = f"{variant}, canonical {want:,}" if want else f"{variant or 'variant unknown'}, not pinned"
        parts.append(f"logs: val_tokens {', '.join(f'{c:,}' for c in counts)} ({where})")
    if data is not None:
        p, r = dataset_check(data, bos)
        parts.append(p)
        reasons += r
    if not parts:
        return Check("data", SKIP, "no val_tokens line in the logs and no dataset folder (--data)")
    return verdict("data", "; ".join(parts), reasons)


def folder_variant(f: Folder) -> str | None:
    found = {log.variant for log in f.logs.values() if log.variant}
    if len(found) == 1:
        return found.pop()
    data = (f.config if isinstance(f.config, dict) else {}).get("data") or {}
    return data.get("hub", {}).get("variant") if data.get("source") == "fineweb" else None


def dataset_check(data: Path, bos: int) -> tuple[str, list[str]]:
    """The val split against the pinned count of its variant, and the train/val document overlap."""
    import numpy as np

    from pgolf.data.overlap import find_overlap, read, split_shards
    from pgolf.formats.shards import MANIFEST, read_manifest

    if not data.is_dir():
        raise PgolfError(f"{data}: dataset folder not found")
    manifest = read_manifest(data) if (data / MANIFEST).exists() else {}
    variant = manifest.get("variant") or (data.name.removeprefix("fineweb10B_") if "fineweb10B_" in data.name else None)
    val, _ = split_shards(data, "val")
    n, sha = 0, hashlib.sha256()
    for p, digest in val:  # verified against the manifest once: find_overlap's read of them is not hashed again
        tokens = np.asarray(read(p, digest))
        n += len(tokens)
        sha.update(tokens.tobytes())
    reasons, want = [], pinned(variant)
    targets = (n - 1) // PIN_SEQ * PIN_SEQ
    if want is not None and targets != want:
        reasons.append(f"{val[0][0]}: the val split holds {n:,} tokens, {targets:,} target tokens at sequence length "
                       f"{PIN_SEQ}; the {variant} export has {want:,}: not the canonical split")
    o = find_overlap(data, bos)
    if o.matches:
        shard, offset, doc = o.found[0]
        reasons.append(f"{data / shard}: holds val document {doc} (at token {offset:,}); {o.matches:,} train "
                       f"document(s) in all are val documents (the #2130 failure)")
    canon = f"canonical {want:,}" if want is not None else "no canonical count to pin"
    text = (f"{data.name}: val {n:,} tokens ({variant or 'not a challenge export'}, {canon}), sha256 of the val "
            f"tokens {sha.hexdigest()[:16]}... (not pinned: none published); {o.val_docs:,} val documents "
            f"compared with {o.train_docs:,} train documents ({o.train_tokens:,} tokens, {o.shards} shards"
            f"{', checksummed' if o.checksummed else ', no pgolf manifest: not checksummed'}), {o.matches} found")
    return text, reasons


# ---------------------------------------------------------------- 6. score-first


def check_score_first(f: Folder) -> Check:
    if f.config is None:
        return Check("score-first", SKIP, "not a pgolf folder (no config.yaml with model and eval sections): "
                     "pgolf check runs no foreign code")
    if isinstance(f.config, str):
        return verdict("score-first", "", [f.config])
    from pgolf.report.scorefirst import audit_config

    try:
        lines, reasons = audit_config(f.config)
    except PgolfError as e:
        return verdict("score-first", "", [f"config.yaml: {e}"])
    return verdict("score-first", "; ".join(lines), reasons)


# ---------------------------------------------------------------- all of it


def run_checks(folder: Path, data: Path | None = None, base: Baseline | None = None, level: str = "rules",
               bos: int = 1, score_first: bool = True) -> list[Check]:
    f = load_folder(folder)
    checks = [check_bytes(f), check_time(f), check_seeds(f), check_significance(f, base, level),
              check_data(f, data, bos)]
    checks.append(check_score_first(f) if score_first else Check("score-first", SKIP, "--no-score-first"))
    return checks


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == FAIL]


def table(checks: list[Check]) -> str:
    """The markdown table, then one line per failure."""
    rows = ["| check | result | evidence |", "| --- | --- | --- |"]
    rows += [f"| {c.name} | {c.status} | {c.evidence.replace('|', '/')} |" for c in checks]
    rows += [""] + [f"FAIL {c.name}: {r}" for c in failed(checks) for r in c.reasons]
    return "\n".join(rows).rstrip() + "\n"


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="a record folder (results/<run>/record, or a challenge record's)")
    ap.add_argument("--data", type=Path, help="a dataset folder (fineweb_{train,val}_*.bin): canonical val and overlap")
    ap.add_argument("--bos", type=int, default=1, help="the BOS id that starts every document (1 in every export)")
    who = ap.add_mutually_exclusive_group()
    who.add_argument("--predecessor", type=Path, help="the record folder this one claims to beat")
    who.add_argument("--predecessor-bpb", type=float, nargs="+", help="the predecessor's seeds' scores")
    ap.add_argument("--level", choices=("rules", "practice"), default="rules",
                    help="significance must reach the rules' level (0.005 nats, p < 0.01) or practice's (p < 0.25)")
    ap.add_argument("--no-score-first", action="store_true", help="skip the perturbation check (it trains on CPU)")
    args = ap.parse_args(argv)
    base = baseline_of(args.predecessor, args.predecessor_bpb)
    checks = run_checks(args.folder, args.data, base, args.level, args.bos, not args.no_score_first)
    print(f"pgolf check {args.folder}\n\n{table(checks)}", end="", flush=True)
    bad = failed(checks)
    if bad:
        for c in bad:
            for r in c.reasons:
                print(f"pgolf check: {c.name}: {r}", file=sys.stderr)
        sys.exit(1)
