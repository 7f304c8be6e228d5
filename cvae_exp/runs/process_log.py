"""One console for a run of several processes (`srun -n 2 cvae-train ...`, hydra.launcher.tasks_per_node=2,
cluster.*): process 0 logs as usual; the others log only warnings and errors, and show no progress bar, so each
line of the run is printed (and written to its log file) once.

The process index is read before JAX's distributed runtime starts (it starts inside the run): `cluster.process_id`
when set, else SLURM's SLURM_PROCID in a job step of more than one task.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator


def process_index(cluster=None) -> int:
    """This process's index in its run: cluster.process_id, SLURM_PROCID under a multi-task step, else 0."""
    if cluster is not None and cluster.get("process_id") is not None:
        return int(cluster.process_id)
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


@contextlib.contextmanager
def primary_only(cfg) -> Iterator[None]:
    """While inside: a process other than 0 logs WARNING and above only (every logger, the run's own file
    included) and its progress bars are off (TQDM_DISABLE); all is restored on the way out."""
    if process_index(cfg.get("cluster")) == 0:
        yield
        return
    previous = logging.root.manager.disable
    bars = os.environ.get("TQDM_DISABLE")
    logging.disable(logging.INFO)  # every record at INFO or below, whatever its logger's own level
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        logging.disable(previous)
        if bars is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = bars
