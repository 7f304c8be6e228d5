"""The fit loop: cadences (log, evaluate, checkpoint), early stopping, the NaN policy and stop signals.

`fit(state, train_step, feed, loop)` runs the jitted step of cvae_exp.training.steps; everything it does besides
stepping goes through the `Loop`'s callbacks, so the loop itself touches no files.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from cvae_exp.errors import Interrupted
from cvae_exp.training.steps import host_value

log = logging.getLogger("cvae_exp")


class StopRequest:
    """SIGTERM/SIGINT ask the loop to checkpoint and stop after the current step; a second one exits."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None  # the first signal, for the exit code (128 + signum)
        self.started = False  # the first step has run (a signal before that stops the start-up instead)
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
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
    """Early stopping on val/elbo (the negative ELBO, lower is better; the mean over the seeds when there
    are several): the run stops after `patience` evaluations in a row that did not lower the best value
    so far by more than `min_delta`. patience 0: never. Only the evaluations of the eval_every cadence
    count. Its state travels in every checkpoint's JSON item, so a resumed run keeps counting."""

    patience: int = 0
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int | None = None
    waited: int = 0  # evaluations since the best

    def update(self, step: int, value: float) -> None:
        if value < self.best - self.min_delta:  # False for NaN: a non-finite evaluation is no improvement
            self.best, self.best_step, self.waited = value, step, 0
        else:
            self.waited += 1

    @property
    def done(self) -> bool:
        return self.patience > 0 and self.waited >= self.patience

    def state(self) -> dict:
        return {
            "best": None if math.isinf(self.best) else self.best,
            "best_step": self.best_step,
            "waited": self.waited,
        }

    def load(self, saved: dict | None) -> None:
        """Takes up the counting of a resumed run (its checkpoint's `state()`); patience and min_delta stay."""
        if saved:
            best = saved.get("best")
            self.best = math.inf if best is None else float(best)
            self.best_step, self.waited = saved.get("best_step"), int(saved.get("waited", 0))


@dataclass
class Loop:
    """The cadences and the side effects the fit loop calls; see `fit`."""

    max_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    batch_size: int  # per seed
    nan_policy: str
    progress: bool
    on_log: Callable[[int, dict], None]
    on_eval: Callable[[int, Any], dict]
    on_checkpoint: Callable[[int, Any, dict], None]
    seeds: int = 1  # models trained together (vmapped); metrics carry a seed axis when > 1
    early_stop: EarlyStopping = field(default_factory=EarlyStopping)
    skip_limit: float = 1.0  # nan_policy=skip: the largest share of skipped steps between evaluations


def fit(state, train_step, feed: Callable[[int], Any], loop: Loop):
    """Runs steps until `max_steps`, early stopping (`loop.early_stop`) or a stop request; returns
    (state, last val metrics, stopped), where `stopped` is the number of the signal that stopped the
    run, or None when it finished (early stopping included)."""
    start = current_step(state)
    val: dict = {}
    if loop.early_stop.done:  # resumed after it had stopped early: nothing left to train
        return state, val, None
    bar = tqdm(total=loop.max_steps, initial=start, disable=not loop.progress, dynamic_ncols=True, unit="step")
    window_start, window_steps = time.perf_counter(), 0
    skips = SkipCount(state, start, loop.skip_limit) if loop.nan_policy == "skip" else None
    with StopRequest() as stop:
        for step in range(start, loop.max_steps):
            # Host work for the next step overlaps the device's work on this one (async dispatch).
            state, metrics = train_step(state, feed(step))
            if not stop.started:
                if stop.requested:  # it came while the first step was compiled: nothing is trained yet
                    bar.close()
                    raise Interrupted(stop.signum)
                stop.started = True
            done = step + 1
            window_steps += 1
            bar.update(1)
            # One read of the flag per step: a signal that lands during this step's logging or evaluation
            # is acted on after the next step, so the stop always goes through the full log/eval/save path.
            stopping = stop.requested
            last = done == loop.max_steps or stopping
            if done % loop.log_every == 0 or last:
                host = jax.device_get(metrics)  # host sync: only on log steps
                _check_finite(state, loop.nan_policy)
                elapsed = time.perf_counter() - window_start
                host = {k: host_value(v) for k, v in host.items()}
                # all seeds together; per seed it is this divided by loop.seeds
                host["examples_per_s"] = window_steps * loop.batch_size * loop.seeds / max(elapsed, 1e-9)
                host["skipped_steps"] = host_value(jax.device_get(state["nonfinite"]))
                loop.on_log(done, host)
                bar.set_postfix(loss=f"{np.mean(host['loss']):.2f}", ex_s=f"{host['examples_per_s']:.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if done % loop.eval_every == 0 or last:
                _check_finite(state, loop.nan_policy)
                if skips is not None:
                    skips.check(state, done)
                val = loop.on_eval(done, state)
                if done % loop.eval_every == 0:
                    loop.early_stop.update(done, val["val/elbo"])
                    if loop.early_stop.done:
                        last = True
                        log.info(
                            "Early stopping at step %d: val/elbo has not improved on %.4f (step %s) in %d evaluations.",
                            done,
                            loop.early_stop.best,
                            loop.early_stop.best_step,
                            loop.early_stop.waited,
                        )
            if done % loop.checkpoint_every == 0 or last:
                _check_finite(state, loop.nan_policy)  # never save parameters past a NaN
                loop.on_checkpoint(done, state, val if done % loop.eval_every == 0 or last else {})
            if stopping:
                bar.close()
                return state, val, stop.signum
            if last:  # early stopping
                break
    bar.close()
    # a signal that came while the last step logged, evaluated or saved: its checkpoint is written; stop there
    return state, val, stop.signum if stop.requested else None


class SkipCount:
    """nan_policy=skip's bound: at each evaluation, the share of the steps since the previous one whose update
    was discarded (the worst seed's) may not exceed `limit`."""

    def __init__(self, state, step: int, limit: float):
        self.limit, self.since, self.before = limit, step, self._read(state)

    @staticmethod
    def _read(state) -> np.ndarray:
        return np.asarray(jax.device_get(state["nonfinite"])).reshape(-1)  # host sync: evaluation steps only

    def check(self, state, step: int) -> None:
        now = self._read(state)
        skipped = int((now - self.before).max())
        if step > self.since and skipped / (step - self.since) > self.limit:
            raise TooManySkipped(step, skipped, self.since, self.limit)
        self.since, self.before = step, now


def current_step(state) -> int:
    """The step of a state, with or without a seed axis (every seed is at the same step)."""
    return int(np.asarray(jax.device_get(state["step"])).reshape(-1)[0])


def _check_finite(state, policy: str) -> None:
    """With several seeds, the first seed to go non-finite stops them all (policy stop)."""
    if policy == "stop" and np.any(np.asarray(state["nonfinite"]) > 0):  # host sync
        first = np.asarray(state["first_nonfinite"])
        raise NonFinite(int(first[first >= 0].min()))
