"""The run directory's side of the training loop (cvae_exp.training.loop.Hooks), for every job of a group:
TensorBoard (one writer per model), the validation pass and its image grids, the log lines, the checkpoints,
and the sentence of a job that fails. One job writes into its own run directory; a job of K seeds
(trainer.num_seeds) writes one checkpoint of their stacked states and one TensorBoard run per seed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cvae_exp.runs import checkpoint, launch
from cvae_exp.runs.metrics import prefixed, seed_values, summarize
from cvae_exp.runs.tensorboard import Writer
from cvae_exp.training.loop import Job


@dataclass
class JobOutput:
    """Where one job's results go."""

    run_dir: Path
    plain: dict  # its config as recorded (checkpoint meta, HPARAMS)
    data: dict  # the data fingerprint, recorded in every checkpoint
    manager: Any  # its Orbax CheckpointManager
    seeds: list[int]
    writers: list[Writer] = field(default_factory=list)  # one per model

    def open_writers(self, resumed_from: int | None) -> None:
        """One TensorBoard run per model: <run dir>/tb, or <run dir>/tb/seed_<s> for each of K > 1 seeds."""
        enabled = self.plain["logger"]["tensorboard"]
        name = (lambda s: f"seed_{s}") if len(self.seeds) > 1 else (lambda s: "")
        self.writers = [
            Writer(self.run_dir, enabled=enabled, resume_step=resumed_from, name=name(s)) for s in self.seeds
        ]


class Outputs:
    """The Hooks of cvae_exp.training.loop.fit for a group's jobs (`outputs[i]` belongs to `jobs[i]`)."""

    def __init__(self, program, jobs: list[Job], outputs: list[JobOutput]):
        self.program, self.jobs, self.outputs = program, jobs, outputs
        self._draw = program.drawer()

    def _out(self, job: Job) -> JobOutput:
        return self.outputs[self.jobs.index(job)]

    def on_log(self, done: int, metrics: dict, jobs: list[Job], examples_per_s: float, skipped) -> None:
        models = sum(len(j.members) for j in self.jobs)
        for job in jobs:
            out = self._out(job)
            checkpoint.raise_failed_save(out.manager)  # a write that failed in the background ends the run here
            launch.check_background_writes()
            for i, writer in zip(job.members, out.writers, strict=True):
                values = seed_values(metrics, i) | {"skipped_steps": float(skipped[i])}
                values["examples_per_s"] = examples_per_s / models  # this model's share
                writer.scalars({f"train/{name}": v for name, v in values.items()}, done)

    def on_eval(self, done: int, state, jobs: list[Job]) -> list[dict]:
        """Each job's validation summary (the mean over its models, each model's under "per_seed")."""
        val = prefixed("val", self.program.evaluate(state["params"], self.program.exp.splits.val))
        summaries = []
        for job in jobs:
            out = self._out(job)
            mine = {name: _take(v, job.members, self.program.vmapped) for name, v in val.items()}
            for i, writer in zip(job.members, out.writers, strict=True):
                writer.scalars(seed_values(mine, i - job.members.start), done)
                if out.plain["logger"]["images"]:
                    key = jax.random.fold_in(self.program.member_key(i), done)
                    for tag, grid in self._draw(i, state["params"], key).items():
                        writer.image(tag, grid, done)
            summary = summarize(mine)
            job.log.info("%sstep %d: %s", job.label, done, ", ".join(f"{n}={summary[n]:.3f}" for n in mine))
            summaries.append(summary)
        return summaries

    def on_checkpoint(self, job: Job, done: int, state, val: dict) -> None:
        out = self._out(job)
        if not out.plain["checkpoint"]["enabled"]:
            return
        checkpoint.raise_failed_save(out.manager)
        meta = {"step": done, "config": out.plain, "data": out.data, **val, "early_stopping": job.early.state()}
        checkpoint.save(out.manager, done, self.program.job_state(state, job.members), meta)

    def fail(self, job: Job, err: Exception) -> str:
        """The job's sentence for a failure of the NaN policy: it saves nothing more; the others go on."""
        out = self._out(job)
        out.manager.wait_until_finished()
        target = self.program.job_target(job.members)
        good = checkpoint.newest_good_before(out.manager, target, err.step)
        where = (
            f"step {good} in {out.manager.directory}."
            if good is not None
            else "none (no checkpoint before it verifies)."
        )
        sentence = f"{err} Training stopped; the last good checkpoint is {where}"
        if job.label:  # a job of a group: its own log says so now; the launcher names it at the end
            job.log.error("%s", sentence)
        return sentence

    def snapshot(self, state, job: Job):
        return self.program.job_state(state, job.members)

    def flush(self) -> None:
        for out in self.outputs:
            for writer in out.writers:
                writer.flush()


def _take(values, span: range, vmapped: bool):
    """A job's members' values out of the group's: a float (one model) or an array over its members."""
    if not vmapped:
        return values
    chosen = np.asarray(values)[span.start : span.stop]
    return chosen if len(span) > 1 else float(chosen[0])
