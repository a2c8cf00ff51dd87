"""The error contract of every stage: a known error is one line `pgolf <stage>: <file>: <problem>`.

A known error is a problem with the run's inputs that pgolf anticipated and phrased for the person
running it: a PgolfError (every error class pgolf defines derives from it), or the OS refusing a
named file. pgolf/cli.py catches it once for every stage and exits 1 without a traceback, which
would only show pgolf's own call stack. Anything else is a bug or an environment failure and keeps
its traceback. PGOLF_TRACEBACK=1 shows the traceback of known errors too.

Under torchrun every rank hits the same bad file, so only rank 0 prints. Under `pgolf launch` no
rank prints: each writes its line into the folder named by PGOLF_ERROR_DIR, and the launcher prints
one of them after torchrun has finished, so that it is the last line of the stage's log.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ERROR_DIR_ENV = "PGOLF_ERROR_DIR"

# The OS errors that are about one file the user named: missing, unreadable, a folder for a file.
_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class PgolfError(ValueError):
    """A bad input, phrased for the person running pgolf: the file (or config key) and what is wrong.

    A ValueError, so callers that guard a parse with `except ValueError` keep working."""


class ConfigError(PgolfError):
    """A config key or value that the schema refuses. Here, not in pgolf.config, so that the stages a
    submission runs can raise it without importing the schema validation."""


def known_message(e: BaseException) -> str | None:
    """The one-line message of a known error; None for an error that must keep its traceback."""
    if isinstance(e, PgolfError):
        return str(e)
    if isinstance(e, _FILE_ERRORS):
        return f"{e.filename}: {e.strerror}" if e.filename is not None else str(e)
    return None


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def error_file(directory: str | Path, rank_: int) -> Path:
    return Path(directory) / f"rank{rank_}"


def one_line(message: str) -> str:
    """A message that lists several problems on lines of their own (a config with two bad keys), as
    one line: "head: first; second"."""
    lines = [" ".join(line.split()) for line in message.splitlines() if line.strip()] or [""]
    head, rest = lines[0], "; ".join(lines[1:])
    return f"{head}{' ' if head.endswith(':') else '; '}{rest}" if rest else head


def report(stage: str, message: str) -> None:
    """Print `pgolf <stage>: <message>` once for the whole run, or hand it to `pgolf launch`."""
    line = f"pgolf {stage}: {one_line(message)}"
    directory = os.environ.get(ERROR_DIR_ENV)
    if directory and Path(directory).is_dir():
        error_file(directory, rank()).write_text(line + "\n")
    elif rank() == 0:
        print(line, file=sys.stderr, flush=True)


def show_traceback() -> bool:
    return os.environ.get("PGOLF_TRACEBACK", "") not in ("", "0")
