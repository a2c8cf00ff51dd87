"""A process torchrun starts dies with torchrun, and one trainer at a time writes a seed folder.

torchrun starts each process in a session of its own, so a SIGKILL of the launcher's process group
(a closed terminal, the OOM killer, `kill -9` of Snakemake) missed the trainer: it trained on and
wrote the seed's outputs when nobody was waiting for them, and after `snakemake --unlock` a second
trainer ran beside it on the same checkpoints.

The process asks the kernel for SIGKILL when its parent dies (Linux prctl PR_SET_PDEATHSIG), or
where there is no prctl, a thread polls the parent's pid. SIGKILL, not SIGTERM: the launcher is
gone only when it was killed hard, and the one who killed it wants the run stopped now. A SIGTERM
would let the trainer finish its step and checkpoint (the path torchrun itself takes when it is
asked to stop), but also finish writing ema.pgt and train.json if it was in its last step, and keep
the seed folder locked while a slow step or a compile runs. Resume after a SIGKILL restarts from
the last periodic checkpoint, which is how every kill-and-resume trial already ends byte-identical.
The kernel signal fires when the parent *thread* that started the process exits; torchrun starts
its processes from its main thread, whose end is the end of torchrun.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO

from pgolf.errors import PgolfError

PR_SET_PDEATHSIG = 1  # linux/prctl.h
LOCK_NAME = "trainer.lock"


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def _pdeathsig(sig: signal.Signals) -> bool:
    """Arm the kernel's parent-death signal; False where prctl does not exist."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, poll_s: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(poll_s: float = 1.0) -> str:
    """Be killed when the parent process ends. Returns how: "prctl" or "watch"."""
    parent = os.getppid()
    how = "prctl" if _pdeathsig(signal.SIGKILL) else "watch"
    if how == "watch":
        threading.Thread(target=_watch, args=(parent, poll_s), daemon=True, name="pgolf-parent-watch").start()
    elif os.getppid() != parent:  # it died between the two calls, before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)
    return how


def lock_seed(ckpt_dir: str | Path) -> IO[str] | None:
    """Rank 0's lock on a training's checkpoint folder, taken before the process group forms so that
    a refused run stops cleanly; none on other ranks, or for a run that keeps no checkpoints (the bench)."""
    if not ckpt_dir or int(os.environ.get("RANK", "0")) != 0:
        return None
    return lock_folder(ckpt_dir)


def lock_folder(folder: str | Path) -> IO[str]:
    """Hold `folder`/trainer.lock for as long as this process lives (the kernel drops it on any exit,
    SIGKILL included); refuse with one line when another process holds it. Keep the returned file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK_NAME, "a+")  # the open file is the lock
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise PgolfError(f"{folder}: another trainer (pid {holder}) is training this seed; "
                         "wait for it to end or stop it, then run again") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
