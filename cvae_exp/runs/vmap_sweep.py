"""`hydra/launcher=vmap`: every job of a multirun composed and checked, partitioned by static signature
(cvae_exp.training.members), and each partition trained as one vmapped program (cvae_exp.runs.group).

Order: compose every job's config → check them all (a refused sweep writes no job directory) → partition →
train the partitions one after another → one JobReturn per job. A job that failed by the NaN policy does
not stop its group: the sweep finishes, then names each failed job in one sentence and exits 2.
Relaunching the same command (with the same hydra.sweep.dir) continues every partition from its newest
verified checkpoint: under this launcher `resume=false` is read as `resume=auto`, as under SLURM.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from omegaconf import OmegaConf, open_dict, read_write

from cvae_exp.config import check_keys, check_targets, resume_mode, validate
from cvae_exp.data import sources
from cvae_exp.errors import UserError
from cvae_exp.runs.rundir import check_not_nested

log = logging.getLogger("cvae_exp")


def compose_jobs(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
    """Every job's config as Hydra's own launchers compose it (load_sweep_config), with its directory."""
    from cvae_exp.runs.group import Job

    jobs = []
    for idx, overrides in enumerate(job_overrides):
        sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        num = initial_job_idx + idx
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{num}"
            sweep_config.hydra.job.num = num
        HydraConfig.instance().set_config(sweep_config)
        run_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
            sweep_config.hydra.runtime.output_dir = str(run_dir.absolute())
        task_cfg = copy.deepcopy(sweep_config)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        jobs.append(Job(num, task_cfg, sweep_config.hydra, run_dir.absolute(), list(overrides)))
    return jobs


def check(job) -> None:
    """A single run's checks, and the launcher's own; nothing is written yet."""
    from cvae_exp.runs.group import check_job, check_saved_model

    cfg = job.cfg
    check_keys(cfg)
    validate(cfg)
    sources.check_path(cfg.data.path)
    check_targets(cfg)
    check_job(cfg)
    check_not_nested(job.run_dir)
    if resume_mode(cfg) == "true" and not any((job.run_dir / "checkpoints").glob("[0-9]*")):
        raise UserError(f"resume=true, but job {job.num}'s directory {job.run_dir} holds no checkpoint.")
    check_saved_model(job)


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    from cvae_exp.runs.launch import Interruptible

    # SIGTERM/SIGINT outside a group's loop (composing, checking, building, restoring, final evaluations): one
    # sentence and 128 + the signal, never Python's silent -15; inside a loop, its own handler checkpoints first
    with Interruptible() as signals:
        return _launch(launcher, job_overrides, initial_job_idx, signals)


def configure_console(launcher) -> None:
    """The launcher's logging as Hydra's launchers set it up, with the console lines in the jobs' own format
    (`[time][logger][LEVEL] - message`, as a single run prints them), not Hydra's `[time][HYDRA]` tags."""
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    from cvae_exp.runs.group import _FORMAT

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setFormatter(logging.Formatter(_FORMAT))


def _launch(launcher, job_overrides, initial_job_idx: int, signals) -> list[JobReturn]:
    if not _is_cvae_train(launcher.task_function):
        raise UserError("hydra/launcher=vmap launches cvae-train multiruns only.")
    if launcher.max_members is not None and launcher.max_members < 1:
        raise UserError(f"hydra.launcher.max_members={launcher.max_members} must be at least 1 (or null for no cap).")
    jobs = compose_jobs(launcher, job_overrides, initial_job_idx)
    for job in jobs:
        check(job)
    from cvae_exp.runs.tensorboard import sweep_keys
    from cvae_exp.training import members

    plains = [OmegaConf.to_container(j.cfg, resolve=True) for j in jobs]
    parts = members.partition(plains, launcher.max_members)
    log.info("vmap launcher: %d jobs in %d partition(s), sweep dir %s", len(jobs), len(parts),
             launcher.config.hydra.sweep.dir)  # fmt: skip
    for p, idxs in enumerate(parts):
        for i in idxs:
            log.info("\t#%d (partition %d): %s", jobs[i].num, p, " ".join(filter_overrides(jobs[i].overrides)))
    swept = sweep_keys(launcher.config.hydra)
    from cvae_exp.runs.group import train_group

    returns: dict[int, JobReturn] = {}
    failed = []
    signals.after_training = (
        "Stopped by {signal} outside training: every job keeps the checkpoints it has written; the same command "
        "(the same hydra.sweep.dir) continues them."
    )
    for p, idxs in enumerate(parts):
        for m in train_group([jobs[i] for i in idxs], p, swept):
            returns[m.job.num] = _job_return(m)
            if m.error is not None:
                failed.append(f"error: job {m.job.num} ({' '.join(m.job.overrides)}): {m.error}")
    if failed:
        print("\n".join(failed), file=sys.stderr)
        sys.exit(2)
    return [returns[j.num] for j in jobs]


def _job_return(member) -> JobReturn:
    job = member.job
    ret = JobReturn(
        overrides=list(job.overrides),
        cfg=job.cfg,
        hydra_cfg=OmegaConf.create({"hydra": job.hydra}),
        working_dir=os.getcwd(),
        task_name=str(job.hydra.job.name),
        status=JobStatus.COMPLETED if member.error is None else JobStatus.FAILED,
    )
    ret.return_value = (member.metrics or {}).get("val/elbo", float("nan"))
    return ret


def _is_cvae_train(task_function) -> bool:
    """Whether Hydra's task function is cvae-train's (also as `python -m cvae_exp.train`, module __main__)."""
    import importlib.util
    import inspect

    train_file = importlib.util.find_spec("cvae_exp.train").origin  # found, not imported: an entry point
    code = getattr(inspect.unwrap(task_function), "__code__", None)
    return code is not None and Path(code.co_filename).resolve() == Path(train_file).resolve()
