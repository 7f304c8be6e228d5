"""The Launchers. Hydra scans this module for plugins on every command, so it imports only Hydra and, when it is
installed, hydra-submitit-launcher (whose module imports no submitit either); the work is in cvae_exp.runs.slurm
and cvae_exp.runs.vmap_slurm."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any, Optional

from hydra.core.utils import JobReturn

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
except ImportError:  # without the [cluster] extra: no SLURM launchers
    SubmititSlurmLauncher = None

_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log format

if SubmititSlurmLauncher is not None:

    class SlurmLauncher(SubmititSlurmLauncher):
        """`hydra/launcher=slurm`: each job of the multirun a task of one SLURM array job, run through Hydra
        on its node by hydra-submitit-launcher's own code (and resubmitted by it on preemption)."""

        def __init__(self, max_members: Optional[int] = None, **params: Any) -> None:
            super().__init__(**params)
            self.max_members = max_members  # vmap_slurm's key (one schema for both): refused when set

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            from cvae_exp.cli import exit_on_user_error  # a refused sweep: one sentence, exit 2
            from cvae_exp.runs import slurm

            return exit_on_user_error(slurm.launch_sweep)(self, job_overrides, initial_job_idx)

    class VmapSlurmLauncher(SlurmLauncher):
        """`hydra/launcher=vmap_slurm`: the vmap launcher's partitions, each trained as one vmapped program
        in a SLURM job of its own (one array job, a task per partition)."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            from cvae_exp.cli import exit_on_user_error
            from cvae_exp.runs import vmap_slurm

            return exit_on_user_error(vmap_slurm.launch)(self, job_overrides, initial_job_idx, GroupTask())


class GroupTask:
    """What each vmap_slurm job runs on its node (submitit pickles it): one partition, with the console set up
    as cvae-train's (Hydra's job log format on the job's stdout, the libraries' notes hidden). `checkpoint` is
    submitit's hook for its preemption signal, sent before the time limit: by then the group has saved every
    member (the loop's stop), and the job is resubmitted as it was."""

    def __call__(self, partition: int, jobs: list, swept: list[str]) -> dict:
        from cvae_exp.cli import library_notes
        from cvae_exp.runs.vmap_slurm import train_partition

        logging.basicConfig(stream=sys.stdout, format=_FORMAT, level=logging.INFO, force=True)  # its own process
        with library_notes(shown=bool(jobs[0].cfg.get("verbose", False))):
            return train_partition(partition, jobs, swept)

    def checkpoint(self, *args: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args)
