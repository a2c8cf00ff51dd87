"""What a record folder's seed logs say: final score, training, calibration and evaluation time,
bytes, val tokens, dataset variant. Read as the logs are, whoever wrote them.

The challenge's records differ in log format from record to record; these are the line kinds read
(each a regular expression below, searched line by line; code that a log embeds has no digits
where these have them, so it never matches):
- score: `<label> val_loss:<x> val_bpb:<y>` (also `=`, an optional `stride:N` between), the
  baseline's `final_int8_zlib_roundtrip_exact` through `final_int6_sliding_window`, `legal_ttt_exact`,
  `quantized_ttt_phased`. The final score is the last such line whose label is no diagnostic
  (`diagnostic ...`, `DIAGNOSTIC ...`, `pre-quantization ...`); per-step validation lines
  (`step:N/M val_loss:` and `N/M val_loss:`) have no label and are never one.
- training: the largest `train_time:<n>ms` / `train_time: <x>m` (step lines, `stopping_early`);
  `wallclock:post_gptq total_elapsed:<x>s` where a record logs training plus calibration itself.
- calibration: `gptq:done in <x>s`, else the sum of `GPTQ:collected N Hessians in <x>s`,
  `gptq:generated N sequences in <x>s`, `gptq:calibrated N layers in <x>s`; pgolf's
  `calibration_time:<n>ms`.
- evaluation: `total_eval_time:<x>s`, else the final score line's `eval_time:<n>ms` (or that of the
  line it repeats, `legal_ttt` for `legal_ttt_exact`).
- bytes: `Serialized model <codec>: N bytes` (the last, compressed one), `Total submission size
  [<codec>]: N bytes`, `Code size[ (compressed|uncompressed)]: N bytes`.
- val tokens: `val_tokens: N`, `val_loader:shards ... tokens:N`; variant: the `fineweb10B_<variant>`
  folder of `val_files:`, `datasets_dir:`, `data_path:`, `train_loader:dataset:` or `val_loader:` lines.
pgolf's own record folders end each seed log with lines in these same forms (pgolf.report.record).
A log none of these lines match is one pgolf check does not read: every check that needs the
missing piece fails, naming the log and the line kind it looked for.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_NUM = r"(\d+(?:\.\d+)?)"
SCORE = re.compile(r"(?:^|\s)(?P<label>[A-Za-z][\w\-]*(?: [A-Za-z][\w\-]*)*?)\s+(?:stride:\d+\s+)?"
                   r"val_loss[:=]\s*(?P<loss>\d+\.\d+)\s+val_bpb[:=]\s*(?P<bpb>\d+\.\d+)")
NOT_FINAL = re.compile(r"diagnostic|pre-quant|pre_quant|prequant", re.IGNORECASE)
EVAL_TIME = re.compile(r"eval_time[:=]\s*(\d+)ms")
TRAIN_TIME = re.compile(r"train_time[:=]\s*" + _NUM + r"\s*(ms|s|m)\b")
POST_GPTQ = re.compile(r"wallclock:post_gptq total_elapsed:" + _NUM + "s")
GPTQ_DONE = re.compile(r"gptq:done in " + _NUM + "s")
GPTQ_PARTS = re.compile(r"(?:GPTQ:collected \d+ Hessians|gptq:generated \d+ sequences|gptq:calibrated \d+ layers)"
                        r" in " + _NUM + "s")
PGOLF_CALIBRATION = re.compile(r"calibration_time[:=]\s*(\d+)ms")
TOTAL_EVAL = re.compile(r"total_eval_time[:=]\s*" + _NUM + "s")
MODEL_BYTES = re.compile(r"Serialized model [^:]+:\s*(\d+) bytes")
TOTAL_BYTES = re.compile(r"Total submission size(?: [^:]+)?:\s*(\d+) bytes")
CODE_BYTES = re.compile(r"Code size(?: \((\w+)\))?:\s*(\d+) bytes")
VAL_TOKENS = re.compile(r"^\s*val_tokens:\s*(\d+)\s*$|val_loader:shards .*tokens:(\d+)")
VARIANT_LINE = re.compile(r"^\s*(?:val_files|datasets_dir|data_path):\s|train_loader:dataset:|val_loader:shards")
VARIANT = re.compile(r"fineweb10B_(sp\d+[A-Za-z0-9_]*|byte\d+)")
STAMP = re.compile(r"^\d{9,}\.\d+ ")  # some records' logs start each line with the Unix time
SEED_NAME = re.compile(r"seed[_-]?(\d+)|[_-](\d+)\.(?:log|txt)$", re.IGNORECASE)  # train_seed42.log, log_42.txt
SEED_LINE = re.compile(r"^\s*seed\s*[:=]\s*(\d+)\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0}


@dataclass
class Score:
    label: str
    bpb: float
    loss: float
    digits: int  # decimals the log prints: the score is known to half a unit of the last one
    eval_s: float | None
    line: int


@dataclass
class SeedLog:
    path: Path
    seed: int | None
    score: Score | None = None
    train_s: float | None = None
    calibration_s: float = 0.0
    calibration_lines: int = 0
    train_plus_calibration_s: float | None = None  # a record's own total, when it logs one
    eval_s: float | None = None
    eval_source: str = ""
    model_bytes: int | None = None
    total_bytes: int | None = None
    code_bytes: dict[str, int] = field(default_factory=dict)  # "plain", "compressed", "uncompressed"
    val_tokens: int | None = None
    variant: str | None = None
    scores: list[Score] = field(default_factory=list)  # every score line, in order
    total_eval_s: float | None = None  # `total_eval_time`, when the log states it


def digits(text: str) -> int:
    return len(text.partition(".")[2])


def read(path: Path, seed: int | None = None) -> SeedLog:
    """The facts a seed log states; a fact it does not state stays None."""
    lines = [STAMP.sub("", line) for line in path.read_text(errors="replace").splitlines()]
    log = SeedLog(path, seed if seed is not None else log_seed(path, lines))
    scores: list[Score] = []
    parts: list[float] = []
    done: float | None = None
    for i, line in enumerate(lines, start=1):
        _read_line(log, line, i, scores, parts)
        if m := GPTQ_DONE.search(line):
            done = float(m.group(1))
    if done is not None:
        log.calibration_s, log.calibration_lines = done, 1
    elif parts:
        log.calibration_s, log.calibration_lines = sum(parts), len(parts)
    log.scores = scores
    pick(log, None)
    return log


def finals(log: SeedLog) -> list[Score]:
    return [s for s in log.scores if not NOT_FINAL.search(s.label)]


def pick(log: SeedLog, claim: float | None,
         agrees: Callable[[float, float, int], bool] | None = None) -> None:
    """The log's final score: the last non-diagnostic score line, or the last one that holds the
    submission's claim (a record may log an evaluation it does not submit after the one it does);
    and the evaluation time that goes with it."""
    cands = finals(log)
    held = [s for s in cands if claim is not None and agrees is not None and agrees(claim, s.bpb, s.digits)]
    log.score = (held or cands or [None])[-1]
    log.eval_s, log.eval_source = None, ""
    if log.total_eval_s is not None:
        log.eval_s, log.eval_source = log.total_eval_s, "total_eval_time"
    elif log.score is not None:
        timed = repeated(log.score, log.scores)
        if timed is not None:
            log.eval_s, log.eval_source = timed.eval_s, f"eval_time of `{timed.label}`"


def repeated(score: Score, scores: list[Score]) -> Score | None:
    """The score line that timed `score`: itself, or an earlier line it repeats (the same label
    without `_exact`, or the same score to that line's digits: `final_int8_zlib_roundtrip_exact`
    repeats the sliding window's score at the end of several records' logs)."""
    if score.eval_s is not None:
        return score
    for s in reversed(scores[: scores.index(score)]):
        same = s.label == score.label.removesuffix("_exact") or round(score.bpb, s.digits) == s.bpb
        if s.eval_s is not None and same:
            return s
    return None


def _read_line(log: SeedLog, line: str, i: int, scores: list[Score], parts: list[float]) -> None:
    if m := SCORE.search(line):
        t = EVAL_TIME.search(line)
        scores.append(Score(m["label"], float(m["bpb"]), float(m["loss"]), digits(m["bpb"]),
                            int(t.group(1)) / 1000 if t else None, i))
    for m in TRAIN_TIME.finditer(line):
        log.train_s = max(log.train_s or 0.0, float(m.group(1)) * _UNIT[m.group(2)])
    if m := POST_GPTQ.search(line):
        log.train_plus_calibration_s = float(m.group(1))
    if (m := GPTQ_PARTS.search(line)) and not GPTQ_DONE.search(line):
        parts.append(float(m.group(1)))
    if m := PGOLF_CALIBRATION.search(line):
        parts.append(int(m.group(1)) / 1000)
    if m := TOTAL_EVAL.search(line):
        log.total_eval_s = float(m.group(1))
    if m := MODEL_BYTES.search(line):
        log.model_bytes = int(m.group(1))
    if m := TOTAL_BYTES.search(line):
        log.total_bytes = int(m.group(1))
    if m := CODE_BYTES.search(line):
        log.code_bytes[m.group(1) or "plain"] = int(m.group(2))
    if m := VAL_TOKENS.search(line):
        log.val_tokens = int(m.group(1) or m.group(2))
    if VARIANT_LINE.search(line) and (found := VARIANT.findall(line)):
        log.variant = found[-1]


# The facts of a training run; a seed's other log (an evaluation rerun, say) lends the ones its chosen log lacks.
RUN_FACTS = ("train_s", "train_plus_calibration_s", "model_bytes", "total_bytes", "val_tokens", "variant")


def merge(chosen: SeedLog, others: list[SeedLog]) -> SeedLog:
    """`chosen` with each run fact it does not state taken from the first of `others` that does."""
    lent = []
    for other in others:
        took = [k for k in RUN_FACTS if getattr(chosen, k) is None and getattr(other, k) is not None]
        if not chosen.calibration_lines and other.calibration_lines:
            chosen.calibration_s, chosen.calibration_lines = other.calibration_s, other.calibration_lines
            took.append("calibration")
        if not chosen.code_bytes and other.code_bytes:
            chosen.code_bytes = dict(other.code_bytes)
        for k in took:
            if k != "calibration":
                setattr(chosen, k, getattr(other, k))
        if took:
            lent.append(str(other.path))
    if lent:
        chosen.path = Path(f"{chosen.path} (+ {', '.join(lent)})")
    return chosen


def log_seed(path: Path, lines: list[str]) -> int | None:
    """The seed a log belongs to: its name's `seed<N>`, else the `seed: N` line of its settings."""
    if m := SEED_NAME.search(path.name):
        return int(m.group(1) or m.group(2))
    for line in lines:
        if m := SEED_LINE.match(line):
            return int(m.group(1))
    return None


def candidates(folder: Path) -> list[Path]:
    """Files of a record folder that may be seed logs: *.log, and *.txt other than requirements."""
    found = [p for p in sorted(folder.rglob("*")) if p.is_file() and
             (p.suffix == ".log" or (p.suffix == ".txt" and not p.name.startswith("requirements")))]
    return [p for p in found if ".git" not in p.parts]
