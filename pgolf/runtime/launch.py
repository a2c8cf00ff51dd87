"""`pgolf launch <torchrun arguments>`: torchrun, whose log ends with the stage's one-line error.

Plain torchrun answers any failed process with its own ChildFailedError traceback (33 lines for one
process), printed after the stage's message, which ends up mid-log. This runs torchrun's launcher
in-process, with a folder where each process writes its known error (pgolf/errors.py) instead of
printing it. When a process reported one, the launcher prints the lowest rank's line, once and
last, and exits 1. When none did (a bug, a crash, a kill), the processes' own tracebacks stay in
the log and torchrun's failure table (exit codes, signals) follows them, without the launcher's
call stack, which says nothing about the failure.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from pgolf.errors import ERROR_DIR_ENV


def reported_error(directory: Path) -> str | None:
    """The known error of the lowest rank that wrote one."""
    files = sorted(directory.glob("rank*"), key=lambda p: int(p.name.removeprefix("rank")))
    for f in files:
        line = f.read_text().strip()
        if line:
            return line
    return None


def _not_the_failure_line(record: logging.LogRecord) -> bool:
    """torchrun logs "failed (exitcode: 1) local_rank: ..." as a process ends; the launcher's last
    line says the same (the known error, or the failure table with the exit codes and pids)."""
    return not str(record.msg).startswith("failed (exitcode")


def cli(argv: list[str]) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_not_the_failure_line)
    with tempfile.TemporaryDirectory(prefix="pgolf-errors-") as directory:
        os.environ[ERROR_DIR_ENV] = directory  # the processes inherit the launcher's environment
        try:
            run(args)
        except ChildFailedError as e:
            line = reported_error(Path(directory))
            print(line if line is not None else e.format_msg(), file=sys.stderr, flush=True)
            sys.exit(1)
        except SignalException as e:  # torchrun passed the signal on to the processes and stopped them
            print(f"pgolf launch: {signal.Signals(e.sigval).name}: stopped", file=sys.stderr, flush=True)
            sys.exit(128 + int(e.sigval))
