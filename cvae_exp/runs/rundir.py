"""The run directory: where it is, and a lock so two live runs never write into the same one.

The lock is the kernel's: `fcntl.flock` on `<run dir>/.lock`, held for the life of the process and
released by the kernel when the process ends however it ends, so there is no stale lock to take over
and a reused PID cannot block a directory. The file records host and PID for the messages only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from cvae_exp.errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
# A reader that asks whether a run is live (cvae-report, cvae-eval) holds a shared lock for a moment: a run
# starting at that moment tries again for this long before it calls the directory busy.
_PROBE_GRACE_S = 0.5


def current_run_dir() -> Path:
    """Hydra's output directory for this job (hydra.run.dir, or the job's folder in a multirun)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir).resolve()
    return Path.cwd().resolve()


# The folders of a run directory that its checkpoint policy deletes from (the newest `keep` and the best stay)
# or moves folders into (damaged checkpoints): no other run may live inside them.
MANAGED = ("checkpoints", "damaged_checkpoints")
_RUN_MARKS = (".hydra", LOCK_NAME, "metrics.json")  # what a run directory holds, whatever wrote it
_SEARCH_DEPTH = 6  # how deep inside a run's managed folders another run is looked for


def _looks_like_run(path: Path) -> bool:
    return any((path / mark).exists() for mark in _RUN_MARKS)


def check_not_nested(run_dir: Path) -> None:
    """Refuses a run directory inside another run's checkpoints/ (or damaged_checkpoints/), or equal to it,
    and one whose own checkpoints/ holds another run: the keep policy of the outer run would delete the
    inner one, or move it to damaged_checkpoints/. Cheap (a few stats); runs before anything is written."""
    run_dir = Path(run_dir).absolute()
    for folder in (run_dir, *run_dir.parents):
        owner = folder.parent
        if folder.name in MANAGED and owner != folder and (_looks_like_run(owner) or _holds_steps(folder)):
            raise UserError(
                f"The run directory {run_dir} {'is' if folder == run_dir else 'lies inside'} {folder}, the "
                f"{folder.name} folder of the run {owner}, whose "
                "checkpoint policy deletes or moves what is there: choose a directory outside it."
            )
    for name in MANAGED:
        inner = _run_inside(run_dir / name)
        if inner is not None:
            raise UserError(
                f"The run directory {run_dir} holds another run, {inner}, inside its {name} folder, which this run's checkpoint "
                "policy would delete or move: move that run out first."
            )


def _holds_steps(folder: Path) -> bool:
    """Whether `folder` holds Orbax step folders (digit names), as a checkpoints folder does."""
    try:
        return any(p.name.isdigit() and p.is_dir() for p in folder.iterdir())
    except OSError:
        return False


def _run_inside(folder: Path) -> Path | None:
    """The first run directory found inside `folder` (its step folders and below), or None."""
    if not folder.is_dir():
        return None
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if here != folder and (set(_RUN_MARKS) & (set(dirnames) | set(filenames))):
            return here
        if len(here.relative_to(folder).parts) >= _SEARCH_DEPTH:
            dirnames[:] = []
    return None


def _owner(path: Path) -> str:
    """Who holds (or last held) the lock, from what the holder wrote: 'PID 123 on host'."""
    try:
        text = path.read_text().split()
    except OSError:
        return "another process"
    return f"PID {text[0]} on {text[1]}" if len(text) >= 2 else "another process"


class RunLock:
    """An exclusive `flock` on `<run dir>/.lock`, held until `release()` or the end of the process.

    Taking it: open (or create) the file, lock it, and check that the path still names the locked file,
    because a holder removes the file when it lets go and a second process may have opened the old one
    in between; if it does not, start over. Letting go: remove the file while still holding the lock.
    """

    def __init__(self, run_dir: Path, grace_s: float = _PROBE_GRACE_S):
        self.path = Path(run_dir) / LOCK_NAME
        self.grace_s = grace_s
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        deadline = time.monotonic() + self.grace_s
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                raise UserError(
                    f"The run directory {self.path.parent} is in use by a live run ({_owner(self.path)}); "
                    "wait for it or choose another hydra.run.dir."
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed it after we opened it: lock the file that is there now
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self._fd = fd
            return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still locked, so no one holds a lock on a file that is gone
        os.close(self._fd)  # the kernel drops the lock with the last descriptor
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run directory's lock (a non-blocking shared-lock probe; no file
    is created or changed)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        return err.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)  # also drops the probe's own shared lock
    return False
