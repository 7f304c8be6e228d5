"""The loop of a vmap group, and what acts per member and what per group.

Per member, as in its separate run: the data order, keys and evaluation keys (its seed), its step budget
(trainer.max_steps: a member that reaches it keeps its state, and the others train on), early stopping
(its own patience and min_delta: a member that stops keeps the state of that step), and the NaN policy (nan_policy=stop:
a member whose loss goes non-finite stops and its job fails with the single run's sentence, the others go
on; skip: its own steps are skipped, its own skip_limit counted). Per group: the cadences (log, eval,
checkpoint: one signature), and stop signals (SIGTERM/SIGINT: every member saves a checkpoint at the
current step and the multirun exits 128 + signal; the same command continues them all). The group ends
when every member is done.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from cvae_exp.config import recorded
from cvae_exp.errors import Interrupted
from cvae_exp.runs import checkpoint
from cvae_exp.runs.tensorboard import Writer, hparams_first, tile
from cvae_exp.training import devices, members, steps
from cvae_exp.training.loop import NonFinite, StopRequest, TooManySkipped

log = logging.getLogger("cvae_exp")


class Announcer:
    """The group's own messages: on the console once, and in every member's log."""

    def __init__(self, handlers: list[logging.Handler]):
        self._log = logging.getLogger("cvae_exp.runs.group")
        self._log.handlers = list(handlers)
        self._log.setLevel(logging.INFO)

    def info(self, msg: str, *args) -> None:
        self._log.info(msg, *args)

    def warning(self, msg: str, *args) -> None:
        self._log.warning(msg, *args)


@dataclass
class GroupRun:
    group: list  # cvae_exp.runs.group.Member
    graphdef: Any
    task: steps.Task
    splits: Any
    data: dict
    traced: list[str]
    hp: dict  # per-member Task arrays (numpy)
    opt: members.MemberOptimizer
    tx: Any
    feed: Any
    shardings: tuple
    eval_batch: int
    cfg: DictConfig
    say: Announcer
    swept: list[str]
    partition: int

    def __post_init__(self):
        state_sharding, eval_sharding = self.shardings
        t = self.cfg.trainer
        self.step_fn = members.make_group_train_step(
            self.graphdef, self.opt, self.tx, self.task, state_sharding, self.feed
        )
        self.eval_fn = members.make_group_eval_step(self.graphdef, self.task, state_sharding)
        self.hp_on_device = jax.device_put(self.hp, state_sharding)  # the traced Task fields, placed once
        self.eval_keys = jax.numpy.stack([steps.eval_keys(m.seed) for m in self.group])
        self.log_every, self.eval_every = t.log_every, t.eval_every
        self.checkpoint_every = self.cfg.checkpoint.every
        self.final: dict[int, dict] = {}  # member index -> its state when it finished (it steps on, ignored)
        self._draw: dict = {}
        self.steps_run = 0
        self.train_s = 0.0

    def evaluate(self, params, split) -> dict:
        """Per-member means over a split (arrays of K values); `params` stacked over the members."""
        fn = lambda p, b, k: self.eval_fn(p, b, k, self.hp_on_device)
        return steps.evaluate(fn, params, split, self.eval_batch, self.shardings[1], self.eval_keys)

    def _active(self, done: int) -> list[int]:
        """Members that trained the step that ended at `done` (and have not failed)."""
        return [i for i, m in enumerate(self.group) if m.error is None and m.start_step < done <= m.until]

    def fit(self, state):
        group, k = self.group, len(self.group)
        for m in group:
            m.writer = Writer(m.job.run_dir, enabled=m.plain["logger"]["tensorboard"], resume_step=m.resumed_from)
        start = max(m.start_step for m in group)
        end = max(m.until for m in group)
        hp = self.hp_on_device
        for i, m in enumerate(group):
            if m.start_step >= m.until:  # finished before this launch: it stays as restored
                self.final[i] = steps.member(state, i)
        bar = tqdm(total=end, initial=start, disable=not self.cfg.trainer.progress, dynamic_ncols=True, unit="step")
        window, window_steps, t0 = time.perf_counter(), 0, time.perf_counter()
        skipped_before = np.asarray(jax.device_get(state["nonfinite"]))
        since = start
        with StopRequest() as stop:
            for step in range(start, end):
                if not any(m.error is None and m.until > step for m in group):
                    break
                state, metrics = self.step_fn(state, self.feed(step), hp)
                if not stop.started:
                    if stop.requested:
                        bar.close()
                        raise Interrupted(stop.signum)
                    stop.started = True
                done = step + 1
                self.steps_run += 1
                window_steps += 1
                bar.update(1)
                stopping = stop.requested
                active = self._active(done)
                last = {i for i in active if done == group[i].until or stopping}
                if last or not (done % self.log_every and done % self.eval_every and done % self.checkpoint_every):
                    self._check_finite(state, active)  # host sync: only where the loop logs, evaluates or saves
                    active = self._active(done)
                    last = {i for i in active if done == group[i].until or stopping}
                if done % self.log_every == 0 or last:
                    host = {name: np.asarray(v) for name, v in jax.device_get(metrics).items()}  # host sync
                    rate = window_steps * self.cfg.trainer.batch_size * k / max(time.perf_counter() - window, 1e-9)
                    skipped = np.asarray(jax.device_get(state["nonfinite"]))
                    for i in active:
                        values = {f"train/{n}": float(v[i]) for n, v in host.items()}
                        values |= {"train/examples_per_s": rate / k, "train/skipped_steps": float(skipped[i])}
                        group[i].writer.scalars(values, done)
                    bar.set_postfix(ex_s=f"{rate:.0f}")
                    window, window_steps = time.perf_counter(), 0
                active = self._active(done)
                if done % self.eval_every == 0 or last:
                    if self.task.nan_policy == "skip":
                        since, skipped_before = self._check_skips(state, active, done, since, skipped_before)
                        active = self._active(done)
                    self._on_eval(state, active, done, last)
                    last |= {i for i in active if group[i].until == done}  # early stopping moved `until`
                for i in self._active(done):
                    if done % self.checkpoint_every == 0 or i in last:
                        self._save(state, i, done, last)
                    if done == group[i].until:  # done: keep its state; the group steps it on, ignored
                        self.final[i] = steps.member(state, i)
                if stopping:
                    bar.close()
                    self._stopped(state, stop.signum)
            if stop.requested:  # it came while the last step logged, evaluated or saved: every checkpoint is written
                bar.close()
                self._stopped(state, stop.signum)
        bar.close()
        self.train_s = time.perf_counter() - t0
        return state

    def _check_finite(self, state, active) -> None:
        if self.task.nan_policy != "stop":
            return
        bad = np.asarray(jax.device_get(state["nonfinite"]))
        first = np.asarray(jax.device_get(state["first_nonfinite"]))
        for i in active:
            if bad[i] > 0:
                self._fail(i, NonFinite(int(first[i])), state)

    def _check_skips(self, state, active, done, since, before):
        now = np.asarray(jax.device_get(state["nonfinite"]))
        limit = self.cfg.trainer.skip_limit
        for i in active:
            skipped = int(now[i] - before[i])
            if done > since and skipped / (done - since) > limit:
                self._fail(i, TooManySkipped(done, skipped, since, limit), state)
        return done, now

    def _fail(self, i: int, err: Exception, state) -> None:
        """The member's job fails with its separate run's sentence; it saves nothing more, the others go on."""
        from cvae_exp.runs.checkpoint import newest_good_before

        m = self.group[i]
        m.manager.wait_until_finished()
        target = checkpoint.abstract(members.plain_state(steps.member(state, i)))
        good = newest_good_before(m.manager, target, err.step)
        where = (
            f"step {good} in {m.manager.directory}." if good is not None else "none (no checkpoint before it verifies)."
        )
        m.error = f"{err} Training stopped; the last good checkpoint is {where}"
        m.log.error("%s", m.error)

    def _on_eval(self, state, active, done, last) -> None:
        if not active:
            return
        val = self.evaluate(state["params"], self.splits.val)
        for i in active:
            m = self.group[i]
            m.val = {f"val/{n}": float(np.asarray(v)[i]) for n, v in val.items()}
            m.writer.scalars(m.val, done)
            if m.plain["logger"]["images"]:
                for tag, grid in self._images(i, state, done).items():
                    m.writer.image(tag, tile(grid), done)
            m.log.info("job %d, step %d: %s", m.job.num, done, ", ".join(f"{n}={v:.3f}" for n, v in m.val.items()))
            if done % self.eval_every == 0:
                m.early.update(done, m.val["val/elbo"])
                if m.early.done and m.until > done:
                    m.until = done
                    m.log.info(
                        "Early stopping at step %d: val/elbo has not improved on %.4f (step %s) in %d evaluations.",
                        done,
                        m.early.best,
                        m.early.best_step,
                        m.early.waited,
                    )

    def _images(self, i: int, state, done: int) -> dict:
        from dataclasses import replace

        from cvae_exp.training.images import drawings

        task = replace(self.task, **{f: type(getattr(self.task, f))(v[i]) for f, v in self.hp.items()})
        if task not in self._draw:
            self._draw[task] = drawings(self.graphdef, task, self.splits.val)
        return self._draw[task](steps.member(state["params"], i), jax.random.fold_in(self.eval_keys[i], done))

    def _save(self, state, i: int, done: int, last: set) -> None:
        m = self.group[i]
        if not m.plain["checkpoint"]["enabled"]:
            return
        checkpoint.raise_failed_save(m.manager)
        val = m.val if done % self.eval_every == 0 or i in last else {}
        meta = {
            "step": done,
            "config": recorded(m.job.cfg),
            "data": self.data,
            **val,
            "early_stopping": m.early.state(),
        }
        checkpoint.save(m.manager, done, members.plain_state(steps.member(state, i)), meta)

    def _stopped(self, state, signum: int) -> None:
        for m in self.group:
            m.manager.wait_until_finished()
            m.writer.close()
        self.say.warning(
            "Stopped by %s at step %d with every job's checkpoint written. Continue with the same command.",
            signal.Signals(signum).name,
            max(int(s) for s in np.asarray(jax.device_get(state["step"]))),
        )
        raise SystemExit(128 + signum)

    def finish(self, state, t0: float) -> None:
        """The final evaluation and every job's metrics.json and HPARAMS."""
        from cvae_exp.runs.metrics import final_metrics, hparams, write_metrics

        k = len(self.group)
        final = steps.stack([self.final.get(i) or steps.member(state, i) for i in range(k)])  # (failed: unused)
        val = self.evaluate(final["params"], self.splits.val) if any(not m.val for m in self.group) else None
        test = self.evaluate(final["params"], self.splits.test)
        mesh_size = self.shardings[0].mesh.size
        machine = {"devices": mesh_size, "processes": 1, "hardware": devices.hardware(mesh_size)}
        wall_seconds = time.perf_counter() - t0
        for i, m in enumerate(self.group):
            if m.error is not None:
                m.writer.close()
                continue
            if not m.val:
                m.val = {f"val/{n}": float(np.asarray(v)[i]) for n, v in val.items()}
            member_test = {f"test/{n}": float(np.asarray(v)[i]) for n, v in test.items()}
            entry = {
                "partition": self.partition,
                "index": i,
                "members": [x.job.num for x in self.group],
                "size": k,
                "traced": self.traced,
            }
            state_i = self.final[i]
            # A single run's metrics.json, plus `group`; examples_per_s is this member's share of the group's
            # (the group's steps at one model's batch: all members' examples together / K).
            metrics = final_metrics(
                step=int(jax.device_get(state_i["step"])),
                val=m.val,
                test=member_test,
                per_seed=[
                    {
                        "skipped_steps": int(jax.device_get(state_i["nonfinite"])),
                        "params_sha256": steps.params_sha256(state_i["params"]),
                    }
                ],
                steps_run=self.steps_run,
                batch_size=self.cfg.trainer.batch_size,
                train_seconds=self.train_s,
                wall_seconds=wall_seconds,
                previous={},
                source=self.data["source"],
                train_examples=self.data["train"],
                early=m.early,
                machine=machine,
            ) | {"group": entry}
            m.metrics = metrics
            m.writer.hparams(
                hparams_first(hparams(recorded(m.job.cfg)), self.swept),
                {
                    f"{s}/{n}": metrics.get(f"{s}/{n}", float("nan"))
                    for s in ("val", "test")
                    for n in ("elbo", "kl", "recon")
                },
                differs=self.swept,
            )
            m.writer.close()
            write_metrics(m.job.run_dir, metrics)
            m.log.info("Done (job %d): %s", m.job.num, json.dumps(metrics))
