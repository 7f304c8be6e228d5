"""`hydra/launcher=vmap`: every job of a multirun composed and checked, partitioned by static signature
(cvae_exp.training.members), and each partition trained as one vmapped program (cvae_exp.runs.group).

Order: compose every job's config → the pre-flight of every job (a refused sweep writes no job directory) →
partition → train the partitions one after another → one JobReturn per job. A job that failed by the NaN
policy does not stop its group: the sweep finishes, then names each failed job in one sentence and exits 2.
Relaunching the same command (with the same hydra.sweep.dir) continues every job from its newest verified
checkpoint: under this launcher `resume=false` is read as `resume=auto`, as under SLURM. A job directory is
continued only by the job that wrote it: a relaunch whose sweep values no longer match (a value removed
renumbers the jobs) is refused before anything is written.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from cvae_exp.errors import UserError
from cvae_exp.runs import launch, preflight, resume
from cvae_exp.runs.rundir import check_not_nested

log = logging.getLogger("cvae_exp")
_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log format


@dataclass
class SweepJob:
    """One job of the multirun as Hydra composed it."""

    num: int  # hydra.job.num
    cfg: DictConfig  # the task config
    hydra: DictConfig  # its `hydra` node (runtime.output_dir set), for <run dir>/.hydra/
    run_dir: Path
    overrides: list[str]  # this job's own overrides (what cvae-report lists)


def compose_jobs(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[SweepJob]:
    """Every job's config as Hydra's own launchers compose it (load_sweep_config), with its directory."""
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
        jobs.append(SweepJob(num, task_cfg, sweep_config.hydra, run_dir.absolute(), list(overrides)))
    return jobs


def check(job: SweepJob, swept: list[str]) -> resume.Resumed:
    """The job's pre-flight (a single run's, with resume read as auto, and its own config as composed: the
    sweep defines it) and the launcher's own checks; nothing is written yet."""
    cfg = job.cfg
    mode = preflight.mode_of(cfg, default_auto=True)
    if cfg.trainer.num_seeds != 1:
        raise UserError(
            f"trainer.num_seeds={cfg.trainer.num_seeds} is not for hydra/launcher=vmap, which trains one model "
            "per job: sweep seed=0,1,... instead."
        )
    if cfg.cluster.coordinator_address is not None or cfg.cluster.num_processes not in (None, 1):
        raise UserError("hydra/launcher=vmap trains in one process: leave cluster.* unset.")
    check_not_nested(job.run_dir)
    try:
        resumed = preflight.check_run(cfg, job.run_dir, mode, merge=False)
    except UserError as err:
        raise UserError(f"Job {job.num}: {err}") from None
    _same_job(job, resumed.saved, swept)
    return resumed


def _same_job(job: SweepJob, saved, swept: list[str]) -> None:
    """A job directory holds the checkpoints of the job that wrote it: the swept values it recorded must be
    this job's (a value removed from the sweep renumbers the jobs after it)."""
    if saved is None or not saved.overrides:
        return
    was, now = _values(saved.overrides, swept), _values(job.overrides, swept)
    if was != now:
        raise UserError(
            f"Job {job.num}'s directory {job.run_dir} holds the checkpoints of the job {' '.join(was) or '(none)'}, "
            f"but job {job.num} of this sweep is {' '.join(now) or '(none)'}: the sweep changed (a value added "
            "or removed renumbers the jobs); relaunch it as it was, or choose another hydra.sweep.dir."
        )


def _values(overrides: list[str], swept: list[str]) -> list[str]:
    keys = {k.lstrip("+~") for k in swept}
    return sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys)


def configure_console(launcher) -> None:
    """The launcher's logging as Hydra's launchers set it up, with the console lines in the jobs' own format
    (`[time][logger][LEVEL] - message`, as a single run prints them), not Hydra's `[time][HYDRA]` tags."""
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setFormatter(logging.Formatter(_FORMAT))


def launch_sweep(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """SIGTERM/SIGINT outside a group's loop (composing, checking, building, restoring, final evaluations): one
    sentence and 128 + the signal, never Python's silent -15; inside a loop, its own handler checkpoints first."""
    launch.begin()  # nothing of this sweep is accepted yet
    with launch.Interruptible() as signals:
        return _launch_sweep(launcher, job_overrides, initial_job_idx, signals)


def _launch_sweep(launcher, job_overrides, initial_job_idx: int, signals) -> list[JobReturn]:
    if not is_cvae_train(launcher.task_function):
        raise UserError("hydra/launcher=vmap launches cvae-train multiruns only.")
    if launcher.max_members is not None and launcher.max_members < 1:
        raise UserError(f"hydra.launcher.max_members={launcher.max_members} must be at least 1 (or null for no cap).")
    swept = launch.swept_by(launcher.config.hydra)
    jobs = compose_jobs(launcher, job_overrides, initial_job_idx)
    checked = [check(job, swept) for job in jobs]
    from cvae_exp.training import members

    parts = members.partition([OmegaConf.to_container(j.cfg, resolve=True) for j in jobs], launcher.max_members)
    log.info("vmap launcher: %d jobs in %d partition(s), sweep dir %s", len(jobs), len(parts),
             launcher.config.hydra.sweep.dir)  # fmt: skip
    for p, idxs in enumerate(parts):
        for i in idxs:
            log.info("\t#%d (partition %d): %s", jobs[i].num, p, " ".join(filter_overrides(jobs[i].overrides)))
    returns, failed = {}, []
    for p, idxs in enumerate(parts):
        specs = train_partition([jobs[i] for i in idxs], p, swept, [checked[i] for i in idxs], signals)
        for i, spec in zip(idxs, specs, strict=True):
            returns[jobs[i].num] = job_return(jobs[i], spec)
            if spec.error is not None:
                failed.append(f"error: job {jobs[i].num} ({' '.join(jobs[i].overrides)}): {spec.error}")
    if failed:
        print("\n".join(failed), file=sys.stderr)
        sys.exit(2)
    return [returns[j.num] for j in jobs]


def train_partition(jobs: list[SweepJob], partition: int, swept: list[str], checked=None, signals=None) -> list:
    """Trains the jobs of one partition as one program (cvae_exp.runs.group.train_group), each job's
    directory locked; returns their JobSpecs (each with `metrics`, or `error` when that job failed)."""
    import contextlib

    from cvae_exp.runs.group import JobSpec, Launch, train_group
    from cvae_exp.runs.rundir import RunLock
    from cvae_exp.training import members

    checked = checked or [check(job, swept) for job in jobs]
    plains = [OmegaConf.to_container(j.cfg, resolve=True) for j in jobs]
    traced = members.varying(plains)
    handlers: list[logging.Handler] = []
    specs = []
    for job, resumed in zip(jobs, checked, strict=True):
        entry = {"partition": partition, "index": len(specs), "members": [j.num for j in jobs], "size": len(jobs),
                 "traced": traced}  # fmt: skip
        specs.append(JobSpec(resumed.cfg, job.run_dir, resumed.saved, _acceptor(job, handlers, partition, traced),
                             logging.getLogger(f"cvae_exp.job{job.num}"), f"job {job.num}, ", {"group": entry}))  # fmt: skip
    how = Launch(
        swept=swept,
        stop_message=lambda name, step: (
            f"Stopped by {name} at step {step} with every job's checkpoint written. Continue with the same command."
        ),
        after_training=lambda step: (
            "Stopped by {signal} after training, during the final evaluation: every job's "
            "checkpoint is written; the same command evaluates them and writes their metrics.json."
        ),
        signals=signals,
    )
    log.info("vmap group %d: jobs %s in one program (%d members; traced per member: %s)", partition,
             ", ".join(str(j.num) for j in jobs), len(jobs), ", ".join(traced) or "nothing")  # fmt: skip
    with contextlib.ExitStack() as held:
        for job in jobs:
            job.run_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(RunLock(job.run_dir))
        try:
            return train_group(specs, how)
        finally:
            for handler in handlers:
                handler.close()


def _acceptor(job: SweepJob, handlers: list, partition: int, traced: list[str]):
    """What accepting the job does: its record (.hydra/), its own log file, and the group's first line in it."""

    def accept() -> None:
        launch.mark_accepted()
        launch.write_run_record(job.run_dir, job.cfg, OmegaConf.create({"hydra": job.hydra}), job.overrides)
        handler = launch.LogFile(job.run_dir / f"{job.hydra.job.name}.log")  # a failed write: one sentence naming it
        handler.setFormatter(logging.Formatter(_FORMAT))
        handlers.append(handler)
        logger = logging.getLogger(f"cvae_exp.job{job.num}")
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        logger.info("vmap group %d: job %d (traced per member: %s)", partition, job.num, ", ".join(traced) or "nothing")

    return accept


def job_return(job: SweepJob, spec) -> JobReturn:
    ret = JobReturn(
        overrides=list(job.overrides),
        cfg=job.cfg,
        hydra_cfg=OmegaConf.create({"hydra": job.hydra}),
        working_dir=os.getcwd(),
        task_name=str(job.hydra.job.name),
        status=JobStatus.COMPLETED if spec.error is None else JobStatus.FAILED,
    )
    ret.return_value = (spec.metrics or {}).get("val/elbo", float("nan"))
    return ret


def is_cvae_train(task_function) -> bool:
    """Whether Hydra's task function is cvae-train's (also as `python -m cvae_exp.train`, module __main__)."""
    import importlib.util
    import inspect

    train_file = importlib.util.find_spec("cvae_exp.train").origin  # found, not imported: an entry point
    code = getattr(inspect.unwrap(task_function), "__code__", None)
    return code is not None and Path(code.co_filename).resolve() == Path(train_file).resolve()
