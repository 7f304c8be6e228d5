"""Early stopping on val/elbo (`trainer.patience`, `trainer.min_delta`): the counter, the fit loop, and a
real run that stops, stays stopped on resume, and goes on when resumed with more patience."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import pytest
import tbevents

from cvae_exp.training import loop as fit_loop


def test_counter_counts_evaluations_since_the_best():
    early = fit_loop.EarlyStopping(patience=2, min_delta=0.5)
    early.update(10, 100.0)
    assert (early.best, early.best_step, early.waited, early.done) == (100.0, 10, 0, False)
    early.update(20, 99.8)  # lower, but not by more than min_delta
    early.update(30, math.nan)  # a non-finite evaluation is no improvement
    assert (early.best, early.waited, early.done) == (100.0, 2, True)
    early.update(40, 98.0)
    assert (early.best, early.best_step, early.waited, early.done) == (98.0, 40, 0, False)


def test_patience_zero_never_stops_and_the_state_round_trips_through_json():
    never = fit_loop.EarlyStopping(patience=0)
    empty = {"best": None, "best_step": None, "waited": 0, "best_seen": None, "best_seen_step": None}
    assert never.state() == empty  # no Infinity in the JSON item
    for step in range(1, 50):
        never.update(step, 1.0)
    assert not never.done and never.waited == 48
    resumed = fit_loop.EarlyStopping(patience=60)
    resumed.load(json.loads(json.dumps(never.state())))
    assert (resumed.best, resumed.best_step, resumed.waited, resumed.patience) == (1.0, 1, 48, 60)


class _Scripted:
    """The loop's hooks with a scripted val/elbo per evaluation; they note what the loop asked for."""

    def __init__(self, values):
        self.script, self.calls = iter(values), {"eval": [], "checkpoint": []}

    def on_log(self, done, metrics, jobs, examples_per_s, skipped):
        pass

    def on_eval(self, done, state, jobs):
        self.calls["eval"].append(done)
        return [{"val/elbo": next(self.script)} for _ in jobs]

    def on_checkpoint(self, job, done, state, val):
        self.calls["checkpoint"].append((done, val))

    def fail(self, job, err):
        return str(err)

    def snapshot(self, state, job):
        return state


def _fit(values: list[float], patience: int, max_steps: int = 100, eval_every: int = 10):
    """fit on a counting step, with a scripted val/elbo per evaluation; returns what it called."""
    hooks = _Scripted(values)

    def train_step(state, batch):
        return {**state, "step": state["step"] + 1}, {"loss": jnp.float32(0.0)}

    plan = fit_loop.Plan(log_every=1000, eval_every=eval_every, checkpoint_every=1000, batch_size=1)
    job = fit_loop.Job(range(0, 1), max_steps, fit_loop.EarlyStopping(patience))
    state = {"step": jnp.int32(0), "nonfinite": jnp.int32(0), "first_nonfinite": jnp.int32(-1)}
    state, stopped = fit_loop.fit(state, train_step, lambda step: None, plan, [job], hooks)
    return int(state["step"]), job.val, stopped, hooks.calls, job.early


def test_fit_stops_after_patience_evaluations_and_checkpoints_the_stopping_step():
    step, val, stopped, calls, early = _fit([5.0, 4.0, 4.5, 4.2, 4.1, 3.0, 1.0, 1.0, 1.0, 1.0], patience=3)
    assert step == 50 and stopped is None and early.done
    assert calls["eval"] == [10, 20, 30, 40, 50]
    assert calls["checkpoint"] == [(50, {"val/elbo": 4.1})]  # off the checkpoint cadence, with its val
    assert (early.best, early.best_step) == (4.0, 20)


def test_best_step_counts_every_evaluation_but_patience_only_the_cadence():
    """A run's last step is evaluated off the cadence: the best value there is its best step (metrics.json's
    best_step, the checkpoint cvae-eval ranks first), while early stopping counts only cadence evaluations."""
    step, _, _, calls, early = _fit([5.0, 4.0, 3.0], patience=0, max_steps=25)
    assert step == 25 and calls["eval"] == [10, 20, 25]
    assert (early.best_step, early.best_seen_step, early.best_seen) == (20, 25, 3.0)
    _, _, _, calls, short = _fit([7.0], patience=0, max_steps=5)  # shorter than one cadence
    assert calls["eval"] == [5] and (short.best_step, short.best_seen_step) == (None, 5)
    old = fit_loop.EarlyStopping(patience=3)
    old.load({"best": 2.0, "best_step": 10, "waited": 1})  # a checkpoint from before best_seen existed
    assert (old.best_seen, old.best_seen_step) == (2.0, 10)


def test_fit_without_patience_runs_to_max_steps():
    step, _, stopped, calls, early = _fit([5.0, 6.0, 7.0, 8.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0], patience=0)
    assert step == 100 and stopped is None and not early.done and len(calls["eval"]) == 10


@pytest.fixture(scope="module")
def stopped_run(session_cli, small_overrides, tmp_path_factory):
    """A real run whose min_delta no evaluation can beat: the first evaluation is the best, two more stop it."""
    run_dir = tmp_path_factory.mktemp("early") / "run"
    args = ("trainer.max_steps=100", "trainer.eval_every=5", "checkpoint.every=1000", "trainer.patience=2")
    result = session_cli(small_overrides(run_dir, *args, "trainer.min_delta=1e9"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, args


def _metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _best_logged_step(run_dir) -> int:
    """The step of the lowest val/elbo the run logged to TensorBoard (every evaluation, its last included)."""
    logged = tbevents.load(run_dir / "tb")
    steps, values = logged.steps("val/elbo"), logged.values("val/elbo")
    return steps[min(range(len(values)), key=values.__getitem__)]


def test_a_real_run_stops_early_and_says_so(stopped_run):
    run_dir, _ = stopped_run
    m = _metrics(run_dir)
    assert (m["step"], m["stopped_early"]) == (15, True)
    assert m["best_step"] == _best_logged_step(run_dir)  # the best val/elbo, whatever min_delta asks of patience
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [15]


def test_resuming_a_stopped_run_trains_nothing_more_patience_goes_on(stopped_run, session_cli, small_overrides):
    run_dir, args = stopped_run
    again = session_cli(small_overrides(run_dir, *args, "trainer.min_delta=1e9", "resume=true"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _metrics(run_dir)["step"] == 15
    # The counter (2 evaluations without improvement) comes back from the checkpoint: 2 more reach 4.
    more = session_cli(small_overrides(run_dir, *args, "trainer.min_delta=1e9", "trainer.patience=4", "resume=true"))
    assert more.returncode == 0, more.stderr[-3000:]
    m = _metrics(run_dir)
    assert (m["step"], m["stopped_early"]) == (25, True) and m["best_step"] == _best_logged_step(run_dir)


def test_impossible_patience_is_refused_by_name(run_cli, small_overrides, tmp_path):
    result = run_cli(small_overrides(tmp_path / "run", "trainer.patience=-1"))
    assert result.returncode != 0 and "trainer.patience=-1 must be at least 0" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
