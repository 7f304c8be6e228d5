"""The run directory: where it is, and a lock so two live runs never write into the same one."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cvae_exp.errors import UserError

log = logging.getLogger(__name__)


def current_run_dir() -> Path:
    """Hydra's output directory for this job (hydra.run.dir, or the job's folder in a multirun)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir).resolve()
    return Path.cwd().resolve()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`<run dir>/.lock` holding the owner's PID; a lock whose process is gone is taken over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise UserError(
                        f"The run directory {self.path.parent} is in use by a live run (PID {pid}); "
                        "wait for it or choose another hydra.run.dir."
                    ) from None
                log.warning("Taking over the stale lock %s (PID %s is not running).", self.path, pid or "unknown")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
