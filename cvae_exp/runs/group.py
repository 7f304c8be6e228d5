"""Training a group of jobs, top to bottom: devices → data → program → restore → records → loop → final
evaluation → each job's metrics.json. A `cvae-train` run is a group of one job (cvae_exp.runs.job); the vmap
launcher hands it the jobs of one static-signature partition (cvae_exp.runs.vmap_sweep). Both differ only in
the jobs and run directories they hand over, and in the words of their messages (`Launch`).

Every job restores its own newest verified checkpoint. Jobs that then stand at different steps (a relaunch
after a fault, a job added to a sweep) train one step-group after another, so that no job redoes a step it has
a checkpoint of and none is stepped past its own checkpoints; each runs the whole group's program (the other
members stepped along and ignored), so its numbers are those of the uninterrupted group, bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
from omegaconf import DictConfig, OmegaConf

from cvae_exp.config import recorded, trusted_modules
from cvae_exp.errors import UserError
from cvae_exp.runs import checkpoint, launch, resume
from cvae_exp.runs.metrics import (
    final_metrics,
    hparams,
    likelihood_note,
    per_seed_results,
    prefixed,
    summarize,
    write_metrics,
)
from cvae_exp.runs.outputs import JobOutput, Outputs, _take
from cvae_exp.runs.tensorboard import hparams_first
from cvae_exp.runs.trained_run import baseline_params
from cvae_exp.training import devices, loop
from cvae_exp.training.experiment import build_experiment, check_eval_batch, training_mesh
from cvae_exp.training.program import Program, build_program

log = logging.getLogger("cvae_exp")


@dataclass
class JobSpec:
    """One job as its launcher hands it over: checked (cvae_exp.runs.preflight), its directory held."""

    cfg: DictConfig  # what it trains (a resumed run: its own config with the command's overrides on top)
    run_dir: Path
    saved: Any  # resume.SavedRun of the run it continues, or None (a fresh run)
    accept: Callable[[], None]  # writes its record (.hydra/) and lets its log reach its file
    log: logging.Logger = log
    label: str = ""  # "" for a run of its own; "job 3, " in a vmap group
    extra: dict = field(default_factory=dict)  # added to its metrics.json (a vmap group's "group" entry)
    metrics: dict | None = None  # its metrics.json, once written
    error: str | None = None  # why it failed (the NaN policy), else None
    resumed_from: int | None = None  # the step of the checkpoint it continued from

    @property
    def plain(self) -> dict:
        return OmegaConf.to_container(self.cfg, resolve=True)

    @property
    def seeds(self) -> list[int]:
        return list(range(self.cfg.seed, self.cfg.seed + self.cfg.trainer.num_seeds))


@dataclass
class Launch:
    """What differs between the commands that train groups."""

    swept: list[str]  # the keys the sweep varies (HPARAMS shows them first)
    stop_message: Callable[[str, int], str]  # (signal name, step) -> the warning after a stop request
    after_training: Callable[[int], str]  # step -> the message of a signal during the final evaluation
    signals: Any = None  # launch.Interruptible: signals outside the loop (checked between phases)
    processes: int = 1


def train_group(specs: list[JobSpec], how: Launch) -> list[JobSpec]:
    """Trains `specs` (one static signature) and writes each job's metrics.json; returns them, each with
    `error` set when that job failed. A stop request checkpoints every job and raises SystemExit(128 + signal)."""
    launch.watch_background_writes()
    t0 = time.perf_counter()
    cfg = specs[0].cfg
    # ---- devices, data and the network (one experiment for the group: they share every shape)
    mesh = training_mesh(cfg)
    exp = build_experiment(cfg)
    check_eval_batch(cfg.trainer.eval_batch_size, exp.splits, mesh)  # before any job directory is written
    baseline = baseline_params(cfg.model.baseline_run, trusted_modules(cfg))
    program = build_program(exp, _member_plains(specs), mesh, baseline)  # refuses a batch larger than the split
    fingerprint = exp.fingerprint
    sizes = (fingerprint[s] for s in ("train", "val", "test"))
    log.info("Data: %s; train %d, val %d, test %d; %s", exp.source, *sizes, exp.geometry.describe())
    for spec in specs:
        resume.check_data(spec.saved, spec.cfg, fingerprint)
    if note := likelihood_note(cfg.model.likelihood, cfg.model.min_log_var):
        log.info("%s", note)  # what the numbers this run prints mean
    outs = [_output(spec, fingerprint) for spec in specs]
    try:
        # ---- restore (verified), then each job is accepted: its record and its log go to disk
        spans = _spans(specs)
        restored = [_restore(spec, out, program, span) for spec, out, span in zip(specs, outs, spans, strict=True)]
        _check(how)
        for spec, out in zip(specs, outs, strict=True):
            spec.accept()
            if spec.resumed_from is not None:
                spec.log.info("%sResumed from step %d in %s", spec.label, spec.resumed_from, out.manager.directory)
        for start in sorted({r[1] for r in restored}):  # one step at a time: the whole group's program
            chosen = [i for i, r in enumerate(restored) if r[1] == start]
            _train(program, [specs[i] for i in chosen], [outs[i] for i in chosen], [restored[i] for i in chosen],
                   [spans[i] for i in chosen], how, mesh, t0)  # fmt: skip
    finally:
        for out in outs:
            out.manager.wait_until_finished()  # Orbax saves are async: the last one must land before exit
            out.manager.close()
    launch.check_background_writes()
    return specs


def _check(how: Launch) -> None:
    if how.signals is not None:
        how.signals.check()  # a signal during start-up that a library swallowed


def _member_plains(specs: list[JobSpec]) -> list[dict]:
    """Every model's resolved config: a job of K seeds (trainer.num_seeds) is K members, seed by seed."""
    return [{**spec.plain, "seed": s} for spec in specs for s in spec.seeds]


def _spans(specs: list[JobSpec]) -> list[range]:
    spans, start = [], 0
    for spec in specs:
        spans.append(range(start, start + len(spec.seeds)))
        start += len(spec.seeds)
    return spans


def _output(spec: JobSpec, fingerprint: dict) -> JobOutput:
    """The job's checkpoint manager and what its checkpoints record (the config as written, never a resolved
    secret: cvae_exp.runs.resume.recorded)."""
    if not (spec.run_dir / "checkpoints").exists():
        launch.created(spec.run_dir / "checkpoints")  # removed again if this launch is refused
    manager = checkpoint.make_manager(spec.run_dir, spec.cfg.checkpoint.keep)
    return JobOutput(spec.run_dir, recorded(spec.cfg), fingerprint, manager, spec.seeds)


def _restore(spec: JobSpec, out: JobOutput, program: Program, span: range) -> tuple[Any, int, loop.EarlyStopping]:
    """The job's newest checkpoint that verifies (damaged ones set aside) and its early stopping; a fresh
    job's first state. Returns (plain job state, step, early stopping)."""
    t = spec.cfg.trainer
    early = loop.EarlyStopping(t.patience, t.min_delta)
    if spec.saved is None:
        return program.fresh_job_state(span), 0, early
    found = checkpoint.restore_newest(out.manager, program.job_target(span))  # raises when none verifies
    checkpoint.set_aside(out.manager, found.damaged)  # so that their steps can be saved again
    early.load(found.meta.get("early_stopping"))
    spec.resumed_from = found.step
    return found.state, found.step, early


def _train(program: Program, specs, outs, restored, spans: list[range], how: Launch, mesh, t0: float) -> None:
    """The jobs of the group that stand at the same step (`spans`: their members in the group): the loop, then
    the final evaluation and metrics."""
    jobs = [
        loop.Job(span, spec.cfg.trainer.max_steps, early, spec.log, spec.label, start=step)
        for spec, span, (_, step, early) in zip(specs, spans, restored, strict=True)
    ]
    for job, out in zip(jobs, outs, strict=True):
        out.open_writers(job.start if job.start else None)
    state = program.group_state([r[0] for r in restored], spans)
    hooks = Outputs(program, jobs, outs)
    t = specs[0].cfg.trainer
    plan = loop.Plan(t.log_every, t.eval_every, specs[0].cfg.checkpoint.every, t.batch_size, t.nan_policy,
                     t.skip_limit, t.progress, t.steps_per_dispatch, getattr(program.feed, "steps_per_epoch", None))  # fmt: skip
    start_step, train_start = min(j.start for j in jobs), time.perf_counter()
    try:
        block = program.block if program.jitted_block is not None else None
        state, stopped = loop.fit(state, program.step, program.feed, plan, jobs, hooks, block)
    except BaseException:
        with contextlib.suppress(Exception):  # the saves and events in flight; a second failure (the same full
            _settle(outs, hooks)  # disk) must not replace the first, which names its file
        raise
    _settle(outs, hooks)
    if stopped:
        _stopped(specs, outs, how, stopped, loop.current_step(state))
    for spec, job in zip(specs, jobs, strict=True):
        spec.error = job.error
    if how.signals is not None:
        how.signals.after_training = how.after_training(loop.current_step(state))
    steps_run = loop.current_step(state) - start_step
    timing = {"steps_run": steps_run, "train_s": time.perf_counter() - train_start, "t0": t0}
    _finish(program, specs, outs, jobs, state, how, mesh, timing)


def _settle(outs: list[JobOutput], hooks: Outputs) -> None:
    """Orbax saves are async and TensorBoard writes on a thread: both land before the run goes on."""
    for out in outs:
        out.manager.wait_until_finished()
    hooks.flush()


def _stopped(specs: list[JobSpec], outs: list[JobOutput], how: Launch, signum: int, step: int) -> None:
    """After a stop request: every job's checkpoint is written; the command ends with 128 + the signal (the
    run did not finish, so `cvae-train && cvae-eval` or a scheduler's afterok must not treat it as done)."""
    for out in outs:
        out.manager.wait_until_finished()
        for writer in out.writers:
            writer.close()
    _say(specs, logging.WARNING, how.stop_message(signal.Signals(signum).name, step))
    loop.hand_over(signum)  # submitit's requeue, when it sent the signal
    raise SystemExit(128 + signum)


def _say(specs: list[JobSpec], level: int, message: str) -> None:
    """A line about the whole group: once on the console (and in a run of its own's log), and in the log file
    of every job of a vmap group."""
    log.log(level, "%s", message)
    for spec in specs:
        if spec.log is not log:
            record = spec.log.makeRecord(spec.log.name, level, __file__, 0, message, None, None)
            for handler in spec.log.handlers:
                handler.handle(record)


def _finish(program: Program, specs, outs, jobs, state, how: Launch, mesh, timing: dict) -> None:
    """The final evaluation of every job that did not fail, its metrics.json and its HPARAMS."""
    finals = [job.final if job.final is not None else program.job_state(state, job.members) for job in jobs]
    params = program.group_state(finals, [job.members for job in jobs])["params"]
    splits = program.exp.splits
    val = None
    if any(not job.val for job in jobs):  # resumed after it had finished: evaluated as it stands
        val = prefixed("val", program.evaluate(params, splits.val))
    test = prefixed("test", program.evaluate(params, splits.test))
    machine = {"devices": mesh.size, "processes": jax.process_count(), "hardware": devices.hardware(mesh.size)}
    for spec, out, job, final in zip(specs, outs, jobs, finals, strict=True):
        if job.error is not None:
            for writer in out.writers:
                writer.close()
            continue
        job_val = job.val or summarize({k: _take(v, job.members, program.vmapped) for k, v in val.items()})
        job_test = {k: _take(v, job.members, program.vmapped) for k, v in test.items()}
        per_seed = per_seed_results(final, job_val, job_test, spec.seeds)
        spec.metrics = (
            final_metrics(
                step=loop.current_step(final),
                val=job_val,
                test=job_test,
                per_seed=per_seed,
                steps_run=timing["steps_run"],
                batch_size=spec.cfg.trainer.batch_size,
                train_seconds=timing["train_s"],
                wall_seconds=time.perf_counter() - timing["t0"],
                previous=_read_json(spec.run_dir / "metrics.json"),
                source=program.exp.source,
                train_examples=len(splits.train.images),
                early=job.early,
                machine=machine,
            )
            | spec.extra
        )
        _close(out, per_seed, how.swept)
        if jax.process_index() == 0:
            write_metrics(spec.run_dir, spec.metrics)
        spec.log.info("Done%s: %s", f" ({spec.label.rstrip(', ')})" if spec.label else "", json.dumps(spec.metrics))


def _close(out: JobOutput, per_seed: list[dict], swept: list[str]) -> None:
    """Each model's HPARAMS summary, then its writer closed. The same metric names in every job, whatever its
    model kind, so the HPARAMS view compares them all; the sweep's swept keys first."""
    run_hparams = hparams_first(hparams(out.plain), swept)
    differs = swept + (["seed"] if len(out.seeds) > 1 else [])  # one TensorBoard run per seed
    for writer, result in zip(out.writers, per_seed, strict=True):
        writer.hparams(
            run_hparams | {"seed": result["seed"]},
            {f"{s}/{n}": result.get(f"{s}/{n}", math.nan) for s in ("val", "test") for n in ("elbo", "kl", "recon")},
            differs=differs,
        )
        writer.close()


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return {}


def failed(specs: list[JobSpec]) -> list[JobSpec]:
    return [spec for spec in specs if spec.error is not None]


def refuse_if_failed(spec: JobSpec) -> None:
    """A run of its own that failed by the NaN policy ends the command with its sentence (exit 2)."""
    if spec.error is not None:
        raise UserError(spec.error)
