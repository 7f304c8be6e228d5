"""`hydra/launcher=vmap_slurm`: the vmap launcher's partitions (cvae_exp.runs.vmap_sweep) trained on a SLURM
cluster, one partition per SLURM job (the tasks of one array job), each as one vmapped program
(cvae_exp.runs.group).

Order, as under hydra/launcher=vmap: compose every job's config → check them all, and the cluster (a refused
sweep submits nothing and writes no job directory) → partition → submit → wait → one JobReturn per job. Every
job directory is what a local vmap sweep writes. A group job that SLURM requeues (preemption, `scontrol
requeue`) or that submitit resubmits before its time limit stops at the current step with every member's
checkpoint written, and each member continues from its newest verified checkpoint; so does the same command
relaunched. A job that failed by the NaN policy, or a group that ended without a result, is named in one
sentence after the others have finished (exit 2; 1 for a group that SLURM ended without a word of its own).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from hydra.core.utils import configure_log, filter_overrides, setup_globals
from omegaconf import OmegaConf

from cvae_exp.errors import UserError
from cvae_exp.runs import launch as launch_record
from cvae_exp.runs import slurm, vmap_sweep

log = logging.getLogger("cvae_exp")


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, task: Callable) -> list:
    """`task(partition, jobs, swept)` is what each SLURM job runs (the plugin's GroupTask: train_partition with
    the node's console set up). A refused sweep raises UserError (the plugin: one sentence, exit 2)."""
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    if not vmap_sweep.is_cvae_train(launcher.task_function):
        raise UserError("hydra/launcher=vmap_slurm launches cvae-train multiruns only.")
    if launcher.max_members is not None and launcher.max_members < 1:
        raise UserError(f"hydra.launcher.max_members={launcher.max_members} must be at least 1 (or null for no cap).")
    for key in ("tasks_per_node", "nodes"):
        if launcher.params.get(key, 1) != 1:
            raise UserError(
                f"hydra.launcher.{key}={launcher.params[key]}: a vmap group trains in one process, one group per "
                f"SLURM job; leave {key}=1 (a sweep spreads over the cluster as several groups)."
            )
    swept = launch_record.swept_by(launcher.config.hydra)
    jobs = vmap_sweep.compose_jobs(launcher, job_overrides, initial_job_idx)
    for job in jobs:
        vmap_sweep.check(job, swept)
    slurm.check_cluster("vmap_slurm", launcher.params.get("partition"))
    from cvae_exp.training import members

    parts = members.partition([OmegaConf.to_container(j.cfg, resolve=True) for j in jobs], launcher.max_members)
    log.info("vmap_slurm launcher: %d jobs in %d partition(s), one SLURM job each; sweep dir %s", len(jobs),
             len(parts), launcher.config.hydra.sweep.dir)  # fmt: skip
    for p, idxs in enumerate(parts):
        for i in idxs:
            log.info("\t#%d (partition %d): %s", jobs[i].num, p, " ".join(filter_overrides(jobs[i].overrides)))
    groups = [[jobs[i] for i in idxs] for idxs in parts]
    names = [f"partition {p} (jobs {', '.join(str(j.num) for j in group)})" for p, group in enumerate(groups)]
    with slurm.job_states():
        made = slurm.executor(launcher.params)
        submitted = slurm.submit(made, task, list(range(len(groups))), groups, [swept] * len(groups))
        results, failed, documented = slurm.outcomes(submitted, names)
    returns = {}
    for group, outcome in zip(groups, results, strict=True):
        for job in group:
            metrics, error = (outcome or {}).get(job.num, (None, "its group ended without a result"))
            returns[job.num] = vmap_sweep.job_return(job, _Finished(metrics, error))
            if outcome is not None and error is not None:
                failed.append(f"error: job {job.num} ({' '.join(job.overrides)}): {error}")
    if failed:
        print("\n".join(failed), file=sys.stderr)
        sys.exit(2 if documented else 1)
    return [returns[j.num] for j in jobs]


class _Finished:
    """What vmap_sweep.job_return reads of a job's outcome: its metrics and error."""

    def __init__(self, metrics: dict | None, error: str | None):
        self.metrics, self.error = metrics, error


def train_partition(partition: int, jobs: list, swept: list[str]) -> dict[int, tuple[dict | None, str | None]]:
    """On the node: one partition through vmap_sweep.train_partition; {job num: (its metrics.json, or None; its
    error, or None)}. A group that cannot start (a job whose checkpoints none restores) names the reason for
    each job."""
    try:
        specs = vmap_sweep.train_partition(jobs, partition, swept)
    except UserError as err:
        return {job.num: (None, str(err)) for job in jobs}
    return {job.num: (spec.metrics, spec.error) for job, spec in zip(jobs, specs, strict=True)}
