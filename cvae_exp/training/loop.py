"""The one training loop: a group of jobs trained by one jitted step, with what acts per job and what per group.

A *job* is one run directory's worth of training: one model (`cvae-train`), K models sharing a config
(`trainer.num_seeds=K`, vmapped), or one member of a vmap launcher's group. Each job has its members (its
models' indices on the member axis), its step budget (trainer.max_steps: a job that reaches it keeps the
state of that step while the group steps on, ignored), early stopping on its SELECTION metric (the mean over
its members), and the NaN policy (nan_policy=stop: a job whose loss goes non-finite fails with one sentence,
the others go on; skip: its steps are skipped and its own skip_limit counted). What acts per group: the
cadences (log, eval, checkpoint) and stop signals (SIGTERM/SIGINT: every job saves at the current step).

`fit` touches no files: what it does besides stepping goes through `Hooks` (the run directory's side, in
cvae_exp.runs). Host syncs happen on log, evaluation and checkpoint steps only.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import numpy as np
from tqdm import tqdm

from cvae_exp.errors import Interrupted
from cvae_exp.training.steps import close_bar

log = logging.getLogger("cvae_exp")

# What early stopping and the "best" checkpoint rank by: the negative ELBO (lower is better); for the
# kinds without a recognition network (baseline, GSNN) the same key holds their negative log-likelihood.
SELECTION = "val/elbo"


# SIGUSR1/SIGUSR2: what SLURM sends before a time limit (sbatch --signal; submitit asks for USR2, its
# preemption signal), and what `scancel --signal` sends.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """SIGTERM/SIGINT/SIGUSR1/SIGUSR2 ask the loop to checkpoint and stop after the current step; a second one
    exits."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None  # the first signal, for the exit code (128 + signum)
        self.started = False  # the first step has run (a signal before that stops the start-up instead)
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            # "Now" means now: die of the signal as if no handler were installed, without waiting for
            # a save in flight (a half-written checkpoint is a temporary folder that resume ignores).
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.requested, self.signum = True, signum
        if self.started:
            log.warning(
                "Received %s: finishing this step, saving a checkpoint, then stopping (send it again to exit at once).",
                signal.Signals(signum).name,
            )

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def hand_over(signum: int) -> None:
    """After the stop's checkpoint: a SIGUSR1/SIGUSR2 that had a Python handler before the loop's (submitit's
    requeue on its preemption signal) is passed on to it now; it may end the process itself."""
    handler = signal.getsignal(signum)
    owner = getattr(handler, "__self__", None)
    if isinstance(owner, StopRequest):  # called inside the loop's `with`: the handler from before it
        handler = owner._previous.get(signum)
    if signum in (signal.SIGUSR1, signal.SIGUSR2) and callable(handler):
        handler(signum, None)


class NonFinite(Exception):
    def __init__(self, step: int):
        super().__init__(f"The loss became NaN or infinite at step {step}.")
        self.step = step


class TooManySkipped(Exception):
    """nan_policy=skip discarded more than `skip_limit` of the steps since the last evaluation."""

    def __init__(self, step: int, skipped: int, since: int, limit: float):
        super().__init__(
            f"trainer.nan_policy=skip discarded {skipped} of the {step - since} steps since step {since} "
            f"({skipped / (step - since):.0%}), more than trainer.skip_limit={limit} ({limit:.0%}), by step {step}."
        )
        self.step = step


@dataclass
class EarlyStopping:
    """Early stopping on SELECTION (lower is better; the mean over a job's members): the job stops after
    `patience` evaluations in a row that did not lower the best value so far by more than `min_delta`.
    patience 0: never. Only the evaluations of the eval_every cadence count for it; `seen` also notes the
    others (a run's last step), so that `best_seen_step` is the step of the best value of every evaluation,
    the checkpoint cvae-eval ranks first. Its state travels in every checkpoint's JSON item, so a resumed
    run keeps counting."""

    patience: int = 0
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int | None = None
    waited: int = 0  # evaluations since the best
    best_seen: float = math.inf  # the best value of any evaluation ...
    best_seen_step: int | None = None  # ... and its step

    def update(self, step: int, value: float) -> None:
        if value < self.best - self.min_delta:  # False for NaN: a non-finite evaluation is no improvement
            self.best, self.best_step, self.waited = value, step, 0
        else:
            self.waited += 1

    def seen(self, step: int, value: float) -> None:
        if value < self.best_seen:  # False for NaN
            self.best_seen, self.best_seen_step = value, step

    @property
    def done(self) -> bool:
        return self.patience > 0 and self.waited >= self.patience

    def state(self) -> dict:
        finite = lambda v: None if math.isinf(v) else v
        return {
            "best": finite(self.best),
            "best_step": self.best_step,
            "waited": self.waited,
            "best_seen": finite(self.best_seen),
            "best_seen_step": self.best_seen_step,
        }

    def load(self, saved: dict | None) -> None:
        """Takes up the counting of a resumed run (its checkpoint's `state()`); patience and min_delta stay.
        A checkpoint from before `best_seen` existed gives the best of the cadence's evaluations."""
        if saved:
            best = saved.get("best")
            self.best = math.inf if best is None else float(best)
            self.best_step, self.waited = saved.get("best_step"), int(saved.get("waited", 0))
            seen = saved.get("best_seen", best)
            self.best_seen = math.inf if seen is None else float(seen)
            self.best_seen_step = saved.get("best_seen_step", self.best_step)


@dataclass
class Job:
    """What the loop knows of one job: its members, budget, early stopping, and how it ended."""

    members: range  # its models' indices on the group's member axis
    until: int  # the step it stops at: trainer.max_steps, or where early stopping ended it
    early: EarlyStopping
    log: logging.Logger = log  # where its own lines go
    label: str = ""  # how its lines name it ("" for a run of its own; "job 3, " in a vmap group)
    start: int = 0  # the step it starts (or resumed) from
    error: str | None = None  # one sentence: why it failed (the NaN policy), else None
    val: dict = field(default_factory=dict)  # its latest validation summary
    final: Any = None  # its state when it finished (the group may step it on, ignored)
    skip_since: int = 0  # nan_policy=skip: the step of its last evaluation ...
    skipped_before: int = 0  # ... and its skipped steps then

    def trains(self, done: int) -> bool:
        """Whether it trained the step that ended at `done`."""
        return self.error is None and self.start < done <= self.until


@dataclass
class Plan:
    """The cadences and policies of the group (one signature: the same for every job)."""

    log_every: int
    eval_every: int
    checkpoint_every: int
    batch_size: int  # per model
    nan_policy: str = "stop"
    skip_limit: float = 1.0  # nan_policy=skip: the largest share of skipped steps between evaluations
    progress: bool = False
    steps_per_dispatch: int = 1  # steps run in one dispatch between the steps where something is due
    epoch_steps: int | None = None  # steps per epoch of the feed (a block stays inside one epoch)


class Hooks(Protocol):
    """The run directory's side of the loop (cvae_exp.runs.hooks)."""

    def on_log(self, done: int, metrics: dict, jobs: list[Job], examples_per_s: float, skipped) -> None: ...

    def on_eval(self, done: int, state, jobs: list[Job]) -> list[dict]: ...

    def on_checkpoint(self, job: Job, done: int, state, val: dict) -> None: ...

    def fail(self, job: Job, err: Exception) -> str: ...

    def snapshot(self, state, job: Job) -> Any: ...


def fit(state, step_fn, feed, plan: Plan, jobs: list[Job], hooks: Hooks, block_fn=None):
    """Steps the group from its jobs' start until every job is done (its budget, early stopping, a failure)
    or a stop request; returns (state, the signal that stopped the loop or None). With `block_fn`
    ((state, feed(step), n) -> (state, metrics)), the steps between two steps where something is due (a log,
    an evaluation, a checkpoint, a job's end, an epoch's end) run `plan.steps_per_dispatch` at a time in one
    dispatch; a stop request is then acted on after the block."""
    skipped = _skipped(state)
    for j in jobs:
        j.skip_since, j.skipped_before = j.start, int(skipped[j.members.start : j.members.stop].max())
        if j.start >= j.until or j.early.done:  # finished before this launch: it stays as restored
            j.until = min(j.until, j.start)
            j.final = hooks.snapshot(state, j)
    step, end = min(j.start for j in jobs), max(j.until for j in jobs)
    bar = tqdm(total=end, initial=step, disable=not plan.progress, dynamic_ncols=True, unit="step")
    window = _Window(plan.batch_size * _models(jobs))
    with StopRequest() as stop:
        while step < end and any(j.error is None and j.until > step for j in jobs):
            n = _block(step, plan, jobs) if block_fn is not None else 1
            # async dispatch: the host runs ahead of the device
            state, metrics = block_fn(state, feed(step), n) if n > 1 else step_fn(state, feed(step))
            if not stop.started:
                if stop.requested:  # it came while the first step was compiled: nothing is trained yet
                    close_bar(bar)
                    raise Interrupted(stop.signum)
                stop.started = True
            step += n
            window.steps += n
            bar.update(n)
            # One read of the flag per step: a signal during this step's logging or evaluation is acted on
            # after the next step, so the stop always goes through the full log/eval/save path.
            stopping = stop.requested
            _after_step(step, state, metrics, plan, jobs, hooks, stopping, window, bar)
            if stopping:
                close_bar(bar)
                return state, stop.signum
    close_bar(bar)
    # a signal that came while the last step logged, evaluated or saved: its checkpoint is written; stop there
    return state, stop.signum if stop.requested else None


def _block(step: int, plan: Plan, jobs: list[Job]) -> int:
    """How many steps from `step` can run in one dispatch: up to the next step where something is due."""
    due = [plan.log_every, plan.eval_every, plan.checkpoint_every] + ([plan.epoch_steps] if plan.epoch_steps else [])
    nxt = min(step + every - step % every for every in due)
    ends = [j.until for j in jobs if j.error is None and j.until > step]
    return max(1, min(plan.steps_per_dispatch, nxt - step, *(u - step for u in ends)))


def _after_step(done, state, metrics, plan: Plan, jobs: list[Job], hooks: Hooks, stopping, window, bar) -> None:
    """What happens after a step: the checks, logging, evaluation, early stopping and checkpoints it is due."""
    active = [j for j in jobs if j.trains(done)]
    ending = [j for j in active if done == j.until or stopping]
    at_log = done % plan.log_every == 0 or bool(ending)
    at_eval = done % plan.eval_every == 0 or bool(ending)
    if at_log or at_eval or done % plan.checkpoint_every == 0:
        _check_finite(state, active, plan, hooks)  # host sync: never log, evaluate or save past a NaN
        active = [j for j in active if j.error is None]
        ending = [j for j in ending if j.error is None]
    if at_log and active:
        host = {name: np.asarray(v) for name, v in jax.device_get(metrics).items()}  # host sync
        hooks.on_log(done, host, active, window.rate(), _skipped(state))
        bar.set_postfix(loss=f"{np.mean(host['loss']):.2f}", ex_s=f"{window.rate():.0f}")
        window.reset()
    if at_eval and active:
        if plan.nan_policy == "skip":
            _check_skips(state, active, done, plan, hooks)
            active = [j for j in active if j.error is None]
        _evaluate(done, state, plan, active, hooks)
        ending = [j for j in active if done == j.until or stopping]
    for j in active:
        if done % plan.checkpoint_every == 0 or j in ending:
            hooks.on_checkpoint(j, done, state, j.val if done % plan.eval_every == 0 or j in ending else {})
        if done == j.until:  # done: keep its state; the group steps it on, ignored
            j.final = hooks.snapshot(state, j)


def _evaluate(done: int, state, plan: Plan, active: list[Job], hooks: Hooks) -> None:
    """The validation pass of the active jobs, and early stopping on its cadence (which may end a job here)."""
    for j, val in zip(active, hooks.on_eval(done, state, active), strict=True):
        j.val = val
        j.early.seen(done, val[SELECTION])
        if done % plan.eval_every:
            continue
        j.early.update(done, val[SELECTION])
        if j.early.done and j.until > done:
            j.until = done
            j.log.info(
                "%sEarly stopping at step %d: %s has not improved on %.4f (step %s) in %d evaluations.",
                j.label,
                done,
                SELECTION,
                j.early.best,
                j.early.best_step,
                j.early.waited,
            )


def _check_finite(state, active: list[Job], plan: Plan, hooks: Hooks) -> None:
    """nan_policy=stop: a job any of whose members went non-finite fails (its first bad step named)."""
    if plan.nan_policy != "stop":
        return
    bad = np.asarray(jax.device_get(state["nonfinite"])).reshape(-1)  # host sync
    first = np.asarray(jax.device_get(state["first_nonfinite"])).reshape(-1)
    for j in active:
        if bad[j.members.start : j.members.stop].max() > 0:
            firsts = first[j.members.start : j.members.stop]
            j.error = hooks.fail(j, NonFinite(int(firsts[firsts >= 0].min())))


def _check_skips(state, active: list[Job], done: int, plan: Plan, hooks: Hooks) -> None:
    """nan_policy=skip: at each evaluation, the share of a job's steps since the previous one whose update
    was discarded (its worst member's) may not exceed skip_limit."""
    now = _skipped(state)
    for j in active:
        count = int(now[j.members.start : j.members.stop].max())
        skipped = count - j.skipped_before
        if done > j.skip_since and skipped / (done - j.skip_since) > plan.skip_limit:
            j.error = hooks.fail(j, TooManySkipped(done, skipped, j.skip_since, plan.skip_limit))
        j.skip_since, j.skipped_before = done, count


def _skipped(state) -> np.ndarray:
    return np.asarray(jax.device_get(state["nonfinite"])).reshape(-1)  # host sync: log and eval steps only


def _models(jobs: list[Job]) -> int:
    return sum(len(j.members) for j in jobs)


class _Window:
    """Examples per second since the last log step (all models together)."""

    def __init__(self, examples_per_step: int):
        self.examples_per_step, self.steps, self.t0 = examples_per_step, 0, time.perf_counter()

    def rate(self) -> float:
        return self.steps * self.examples_per_step / max(time.perf_counter() - self.t0, 1e-9)

    def reset(self) -> None:
        self.steps, self.t0 = 0, time.perf_counter()


def current_step(state) -> int:
    """The step of a state, with or without a member axis (the newest member's)."""
    return int(np.asarray(jax.device_get(state["step"])).reshape(-1).max())
