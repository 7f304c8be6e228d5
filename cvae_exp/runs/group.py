"""One vmap group, top to bottom: devices → data → the members' states → restore → records → loop → final
evaluation → each job's metrics.json. `cvae_exp.runs.vmap_sweep` calls `train_group` for every partition.

Every member is an ordinary job: its own directory with `.hydra/`, `train.log`, `tb/`, `checkpoints/`
(single-run checkpoints of its own state, cvae_exp.training.members.plain_state) and `metrics.json`, equal to what a
separate `cvae-train` run of its config writes, plus a `group` entry. What acts per member and what per
group: see cvae_exp.runs.group_loop.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf

from cvae_exp.errors import UserError
from cvae_exp.runs import checkpoint
from cvae_exp.runs.launch import RECORD_DIR, LogFile, _write, watch_background_writes
from cvae_exp.runs.metrics import likelihood_note
from cvae_exp.runs.rundir import RunLock
from cvae_exp.runs.trained_run import baseline_params
from cvae_exp.training import devices, members, steps
from cvae_exp.training.experiment import build_experiment, check_eval_batch, training_mesh
from cvae_exp.training.feed import make_feed
from cvae_exp.training.loop import EarlyStopping

log = logging.getLogger("cvae_exp")
_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log format


@dataclass
class Job:
    """One job of the multirun as Hydra composed it."""

    num: int  # hydra.job.num
    cfg: DictConfig  # the task config
    hydra: DictConfig  # its `hydra` node (runtime.output_dir set), for <run dir>/.hydra/
    run_dir: Path
    overrides: list[str]  # this job's own overrides (what cvae-report lists)


@dataclass
class Member:
    """A job inside the group: what the host keeps for it besides its slice of the stacked state."""

    job: Job
    plain: dict  # the resolved config
    until: int  # the step it stops at: trainer.max_steps, or where early stopping ended it
    early: EarlyStopping
    manager: object = None
    writer: object = None
    log: logging.Logger | None = None
    val: dict = field(default_factory=dict)  # its latest val/* floats
    error: str | None = None  # one sentence: why this job failed (the NaN policy), else None
    resumed_from: int | None = None
    start_step: int = 0
    metrics: dict | None = None  # its metrics.json, once written

    @property
    def seed(self) -> int:
        return self.plain["seed"]


def check_job(cfg: DictConfig) -> None:
    """What the vmap launcher refuses beyond a single run's checks (one sentence naming the key)."""
    if cfg.trainer.num_seeds != 1:
        raise UserError(
            f"trainer.num_seeds={cfg.trainer.num_seeds} is not for hydra/launcher=vmap, which trains one model "
            "per job: sweep seed=0,1,... instead."
        )
    if cfg.cluster.coordinator_address is not None or cfg.cluster.num_processes not in (None, 1):
        raise UserError("hydra/launcher=vmap trains in one process: leave cluster.* unset.")


def check_saved_model(job: Job) -> None:
    """A job directory that holds checkpoints of another model (a changed shape key) is refused by name
    before anything is written, rather than having its checkpoints fail to restore and set aside."""
    if not (job.run_dir / "checkpoints").is_dir():
        return
    manager = checkpoint.make_manager(job.run_dir, job.cfg.checkpoint.keep, read_only=True)
    found = checkpoint.newest_meta(manager)
    manager.close()
    saved = (found[1].get("config") if found else None) or {}
    changed = checkpoint.changed_shape_keys(saved, OmegaConf.to_container(job.cfg, resolve=True)) if saved else []
    if changed:
        raise UserError(
            f"Job {job.num}'s directory {job.run_dir} holds checkpoints of another model ({', '.join(changed)} "
            "changed): relaunch it with its own overrides, or choose another hydra.sweep.dir."
        )


def member_logger(job: Job, handlers: list) -> logging.Logger:
    """The job's own log (<run dir>/<job name>.log) beside the console; `handlers` collects the file
    handlers, which also receive the group's messages."""
    handler = LogFile(job.run_dir / f"{job.hydra.job.name}.log")  # a failed write: one sentence naming it
    handler.setFormatter(logging.Formatter(_FORMAT))
    handlers.append(handler)
    logger = logging.getLogger(f"cvae_exp.job{job.num}")
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    return logger


def write_record(job: Job) -> None:
    """<run dir>/.hydra/{config,hydra,overrides}.yaml, as Hydra writes them for any job."""
    out = job.run_dir / RECORD_DIR
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "config.yaml", OmegaConf.to_yaml(job.cfg))
    _write(out / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": job.hydra})))
    _write(out / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(job.overrides))))


def restore(group: list[Member], fresh: list[dict], shardings) -> tuple[list[dict], int | None]:
    """Each member's state from the group's newest verified checkpoint: the newest step at which every
    member has a checkpoint, a member that had finished by then counting with its final one. Damaged
    checkpoints are set aside, as a single run does. Returns the states (plain or fresh) and the step."""
    on_disk = [sorted(m.manager.all_steps(), reverse=True) for m in group]
    if not any(on_disk):
        return fresh, None
    finished = []  # per member: {step: True} for checkpoints that ended it (max_steps or early stopping)
    for m, saved in zip(group, on_disk, strict=True):
        ends = {}
        for s in saved:
            meta = checkpoint.read_meta(m.manager, s) or {}
            probe = EarlyStopping(m.plain["trainer"]["patience"])
            probe.load(meta.get("early_stopping"))
            ends[s] = s >= m.plain["trainer"]["max_steps"] or probe.done
        finished.append(ends)
    for step in sorted({s for saved in on_disk for s in saved}, reverse=True):
        chosen = []
        for saved, ends in zip(on_disk, finished, strict=True):
            at = step if step in saved else max((s for s in saved if s < step and ends[s]), default=None)
            chosen.append(at)
        if None in chosen:
            continue
        states, damaged = [], False
        for m, at, init, sharding in zip(group, chosen, fresh, shardings, strict=True):
            target = checkpoint.abstract(jax.device_put(members.plain_state(init), sharding))
            try:
                restored = checkpoint.restore_first(m.manager, target, [at])
            except UserError:
                checkpoint.set_aside(m.manager, [at])
                on_disk = [sorted(x.manager.all_steps(), reverse=True) for x in group]
                damaged = True
                break
            m.early.load(restored.meta.get("early_stopping"))
            m.resumed_from = restored.step
            if m.early.done:
                m.until = restored.step
            states.append(members.from_plain(restored.state, init))
        if not damaged:
            return states, step
    raise UserError(
        "No step has a checkpoint that restores and verifies for every job of the group "
        f"({', '.join(str(m.job.run_dir) for m in group)})."
    )


def train_group(jobs: list[Job], partition: int, swept: list[str]) -> list[Member]:
    """Trains the jobs of one partition as one program; returns its members (each with `error` set when
    that job failed). A stop signal checkpoints every member and raises SystemExit(128 + signal)."""
    from cvae_exp.runs import group_loop

    watch_background_writes()
    t0 = time.perf_counter()
    plains = [OmegaConf.to_container(j.cfg, resolve=True) for j in jobs]
    cfg = jobs[0].cfg
    t = cfg.trainer
    traced = members.varying(plains)
    group = [
        Member(j, p, p["trainer"]["max_steps"], EarlyStopping(p["trainer"]["patience"], p["trainer"]["min_delta"]))
        for j, p in zip(jobs, plains, strict=True)
    ]
    k = len(group)

    # ---- devices
    mesh = training_mesh(cfg)
    state_sharding, batch_sharding = devices.replicated(mesh), devices.data_sharded(mesh, k)
    eval_sharding = devices.data_sharded(mesh)
    eval_batch = devices.round_to_devices(t.eval_batch_size, mesh)

    # ---- data, model and the members' optimizers and states
    exp = build_experiment(cfg)
    check_eval_batch(t.eval_batch_size, exp.splits, mesh)  # before any job directory is written
    splits, task, graphdef = exp.splits, exp.task, exp.graphdef
    opt, txs, fresh = members.initial_states(exp, plains, traced, baseline_params(exp.baseline_run))
    data = exp.fingerprint

    with contextlib.ExitStack() as held:
        # ---- the job directories: locked, checkpoints restored, then the records and logs go to disk
        for m in group:
            m.job.run_dir.mkdir(parents=True, exist_ok=True)
            held.enter_context(RunLock(m.job.run_dir))
            m.manager = checkpoint.make_manager(m.job.run_dir, m.plain["checkpoint"]["keep"])
        states, resumed_at = restore(group, fresh, [state_sharding] * k)
        state = jax.device_put(steps.stack(states), state_sharding)
        handlers: list[logging.Handler] = []
        for m in group:
            write_record(m.job)
            m.log = member_logger(m.job, handlers)
            m.start_step = int(np.asarray(jax.device_get(state["step"]))[group.index(m)])
        say = group_loop.Announcer(handlers)
        say.info(
            "vmap group %d: jobs %s in one program (%d members; traced per member: %s)",
            partition,
            ", ".join(str(m.job.num) for m in group),
            k,
            ", ".join(traced) or "nothing",
        )
        say.info("Devices: %d (%s); data: %s; train %d, val %d, test %d", mesh.size, jax.devices()[0].platform,
                 exp.source, data["train"], data["val"], data["test"])  # fmt: skip
        if resumed_at is not None:
            say.info("Resumed the group at step %d", resumed_at)
        if note := likelihood_note(cfg.model.likelihood, cfg.model.min_log_var):
            say.info(note)
        run = group_loop.GroupRun(
            group=group,
            graphdef=graphdef,
            task=task,
            splits=splits,
            data=data,
            traced=traced,
            hp=members.task_values(plains, traced),
            opt=opt,
            tx=txs[0],
            feed=make_feed(
                splits.train, t.batch_size, [m.seed for m in group], state_sharding, batch_sharding, t.data_on_device
            ),  # fmt: skip
            shardings=(state_sharding, eval_sharding),
            eval_batch=eval_batch,
            cfg=cfg,
            say=say,
            swept=swept,
            partition=partition,
        )
        try:
            state = run.fit(state)
            run.finish(state, t0)
        finally:
            for m in group:
                m.manager.wait_until_finished()
                m.manager.close()
            for h in handlers:
                h.close()
    return group
