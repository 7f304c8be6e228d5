"""One training run, top to bottom: checks → devices → data → experiment → restore → loop → final metrics.
`cvae_exp.train` calls `run_training` after Hydra has composed the config; each section below is one helper.
JAX is imported only once the checks have passed (a refused command starts no runtime)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cvae_exp.config import RESUME, check_keys, check_targets, recorded, resume_mode, validate
from cvae_exp.data import sources
from cvae_exp.errors import Interrupted, UserError
from cvae_exp.runs import launch
from cvae_exp.runs.metrics import (
    final_metrics,
    hparams,
    likelihood_note,
    per_seed_results,
    prefixed,
    seed_values,
    summarize,
    write_metrics,
)
from cvae_exp.runs.rundir import RunLock, check_not_nested, current_run_dir

log = logging.getLogger("cvae_exp")


def run_training(cfg: DictConfig) -> dict:
    """Trains the run `cfg` describes in Hydra's run directory and returns what it writes to metrics.json."""
    launch.begin()
    with launch.Interruptible() as signals:  # SIGTERM/SIGINT before the loop: exit 143/130, nothing trained
        mode = _checks(cfg)
        run_dir = current_run_dir()
        check_not_nested(run_dir)  # no run inside another's checkpoints, where its keep policy deletes
        # One lock per run: in a multi-process run every process shares the directory; process 0 holds it.
        with RunLock(run_dir) if _primary_process(cfg) else contextlib.nullcontext():
            return _train(cfg, run_dir, mode, signals)


def _train(cfg: DictConfig, run_dir: Path, mode: str, signals: launch.Interruptible) -> dict:
    """The run once its directory is held, section by section."""
    _start_runtime(cfg)
    from cvae_exp.runs import checkpoint, resume
    from cvae_exp.runs.trained_run import baseline_params
    from cvae_exp.training import loop
    from cvae_exp.training.experiment import build_experiment, on_devices

    launch.watch_background_writes()
    start_time = time.perf_counter()
    # ---- the config: this command's, or (resume) the run's own with the command's overrides on top;
    # a changed shape or data source is refused here, before the slow parts
    resumed = resume.settle(cfg, run_dir, mode)
    cfg = resumed.cfg
    # ---- devices
    mesh = _devices(cfg, run_dir)
    # ---- data, model and optimizer; the checkpoints first, so that a fresh run into a directory that holds
    # some is refused before the data loads
    manager = _checkpoints(cfg, run_dir, mode)
    exp = build_experiment(cfg)
    # ---- experiment: the feed (which refuses a batch larger than the split) and the first state on the
    # devices; then the data is logged and checked against what a resumed run trained on
    placed = on_devices(exp, cfg, mesh, baseline_params(cfg.model.baseline_run))
    fingerprint = _data_fingerprint(exp, resumed)
    target = checkpoint.abstract(placed.state)  # what a checkpoint of this run restores onto
    # ---- restore (verified), then the run is accepted: its record and its log go to disk
    early = loop.EarlyStopping(cfg.trainer.patience, cfg.trainer.min_delta)
    state, resumed_from = _restore(manager, target, placed.state, resumed, early)
    signals.check()  # a signal during start-up that a library swallowed
    launch.accept(run_dir, cfg, resumed.overrides, resumed.choices, write_record=_process_index() == 0)
    # ---- loop
    hooks = _Hooks.build(cfg, run_dir, exp, mesh, placed, manager, early, fingerprint, resumed_from)
    start_step = loop.current_step(state)
    train_start = time.perf_counter()
    state, val, stopped = _fit(cfg, exp, placed, state, target, hooks, manager)
    _stop_if_signalled(cfg, run_dir, state, stopped, hooks, manager, signals)
    # ---- final evaluation and metrics.json
    steps_run = loop.current_step(state) - start_step
    if steps_run == 0:  # a finished run resumed once more: report it as it stands
        val = summarize(prefixed("val", hooks.evaluate(state["params"], exp.splits.val)))
    test = prefixed("test", hooks.evaluate(state["params"], exp.splits.test))
    previous = _read_json(run_dir / "metrics.json")
    train_seconds = time.perf_counter() - train_start
    per_seed = per_seed_results(state, val, test, placed.seeds)
    metrics = final_metrics(
        step=loop.current_step(state),
        val=val,
        test=test,
        per_seed=per_seed,
        steps_run=steps_run,
        batch_size=cfg.trainer.batch_size,
        train_seconds=train_seconds,
        wall_seconds=time.perf_counter() - start_time,
        previous=previous,
        source=exp.source,
        train_examples=len(exp.splits.train.images),
        early=early,
        machine=_machine(mesh),
    )
    hooks.close(per_seed)
    manager.close()
    launch.check_background_writes()
    if _process_index() == 0:
        write_metrics(run_dir, metrics)
    log.info("Done: %s", json.dumps(metrics))
    return metrics


# ----------------------------------------------------------------------------- checks


def _checks(cfg: DictConfig) -> str:
    """Every config value and the data path, before anything slow happens; returns the resume mode."""
    check_keys(cfg)
    mode = resume_mode(cfg)
    if mode not in RESUME:
        raise UserError(f"resume={mode} is not one of {', '.join(RESUME)}.")
    if mode == "false" and "SLURM_JOB_ID" in os.environ:
        # A preempted SLURM job is resubmitted with the same command: it must pick up its own checkpoints.
        mode = "auto"
    if mode == "false":  # a resumed run is checked once its own config is known (resume.settle)
        validate(cfg)
        sources.check_path(cfg.data.path)
        check_targets(cfg)  # imports optax (and JAX): after the checks that need nothing
    return mode


def _primary_process(cfg: DictConfig) -> bool:
    """Whether this is process 0 of its run, known before JAX's distributed runtime starts."""
    if cfg.cluster.process_id is not None:
        return cfg.cluster.process_id == 0
    return os.environ.get("SLURM_PROCID", "0") == "0"


# ----------------------------------------------------------------------------- devices


def _start_runtime(cfg: DictConfig) -> None:
    """JAX's distributed runtime (multi-process runs), before any other JAX call."""
    from cvae_exp.training import devices

    _share_accelerator_between_jobs()
    devices.initialize_distributed(cfg.cluster)


def _share_accelerator_between_jobs() -> None:
    """Jobs of the joblib launcher run side by side on one machine: none may preallocate the GPU."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and "Joblib" in str(HydraConfig.get().launcher.get("_target_", "")):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _devices(cfg: DictConfig, run_dir: Path):
    """The mesh the run trains on, logged."""
    import jax

    from cvae_exp.training.experiment import training_mesh

    mesh = training_mesh(cfg)
    log.info(
        "Devices: %d (%s), processes: %d; run dir: %s",
        mesh.size,
        jax.devices()[0].platform,
        jax.process_count(),
        run_dir,
    )
    return mesh


def _process_index() -> int:
    import jax

    return jax.process_index()


def _machine(mesh) -> dict:
    """What metrics.json records about where the run trained."""
    import jax

    from cvae_exp.training import devices

    return {
        "devices": mesh.size,
        "processes": jax.process_count(),
        "hardware": devices.hardware(mesh.size),
    }


# ----------------------------------------------------------------------------- data


def _checkpoints(cfg: DictConfig, run_dir: Path, mode: str):
    """The run's checkpoint manager; a fresh run (resume=false) refuses a directory that holds checkpoints."""
    from cvae_exp.runs import checkpoint

    if not (run_dir / "checkpoints").exists():
        launch.created(run_dir / "checkpoints")  # removed again if this launch is refused
    manager = checkpoint.make_manager(run_dir, cfg.checkpoint.keep)
    if mode == "false" and manager.all_steps():
        raise UserError(
            f"{run_dir} already holds checkpoints (newest step {manager.latest_step()}); "
            "pass resume=true to continue it, or choose another hydra.run.dir."
        )
    return manager


def _data_fingerprint(exp, resumed) -> dict:
    """What a checkpoint records it was trained on (the source and the split sizes), logged; a resume on other
    data is refused (resume_data_change)."""
    from cvae_exp.runs import resume

    fingerprint = exp.fingerprint
    log.info("Data: %s; train %d, val %d, test %d", exp.source, *(fingerprint[s] for s in ("train", "val", "test")))
    resume.check_data(resumed, fingerprint)
    note = likelihood_note(resumed.cfg.model.likelihood, resumed.cfg.model.min_log_var)
    if note:  # what the numbers this run prints mean
        log.info(note)
    return fingerprint


# ----------------------------------------------------------------------------- restore


def _restore(manager, target, state: dict, resumed, early) -> tuple[dict, int | None]:
    """A resumed run's newest checkpoint that verifies (damaged ones set aside) and its early-stopping count;
    a fresh run's `state` as it is. Returns (state, the step resumed from or None)."""
    from cvae_exp.runs import checkpoint

    if resumed.saved is None:
        return state, None
    restored = checkpoint.restore_newest(manager, target)  # raises when none restores and verifies
    checkpoint.set_aside(manager, restored.damaged)  # so that their steps can be saved again
    early.load(restored.meta.get("early_stopping"))
    log.info("Resumed from step %d in %s", restored.step, manager.directory)
    return restored.state, restored.step


# ----------------------------------------------------------------------------- loop


@dataclass
class _Validation:
    """Means over a whole split with the run's fixed validation keys (every seed on the same batches)."""

    eval_step: Any
    batch_size: int  # trainer.eval_batch_size rounded up to a multiple of the devices
    sharding: Any
    key: Any

    def __call__(self, params, split) -> dict:
        from cvae_exp.training import steps

        return steps.evaluate(self.eval_step, params, split, self.batch_size, self.sharding, self.key)


@dataclass
class _Hooks:
    """What the fit loop calls on log, evaluation and checkpoint steps: TensorBoard (one writer per seed),
    the validation pass and its images, the checkpoints."""

    cfg: DictConfig
    plain: dict  # the config as recorded in every checkpoint and the hparams (config.recorded)
    data: dict  # the data fingerprint, recorded in every checkpoint
    manager: Any
    early: Any  # loop.EarlyStopping
    evaluate: _Validation
    writers: list
    val_split: Any
    draw: Any  # (params, key) -> {tag: image grid}
    num_seeds: int

    @classmethod
    def build(cls, cfg, run_dir, exp, mesh, placed, manager, early, fingerprint, resumed_from) -> _Hooks:
        from cvae_exp.runs.tensorboard import Writer
        from cvae_exp.training import devices, images, steps

        num_seeds = cfg.trainer.num_seeds
        eval_step = steps.make_eval_step(exp.graphdef, exp.task, placed.state_sharding, num_seeds)
        evaluate = _Validation(
            eval_step,
            devices.round_to_devices(cfg.trainer.eval_batch_size, mesh),
            devices.data_sharded(mesh),  # every seed is evaluated on the same batch
            steps.eval_keys(cfg.seed, num_seeds),
        )
        # One TensorBoard run per seed: <run dir>/tb, or <run dir>/tb/seed_<s> for each of K > 1 seeds.
        writers = [
            Writer(
                run_dir,
                enabled=cfg.logger.tensorboard,
                resume_step=resumed_from,
                name=f"seed_{seed}" if num_seeds > 1 else "",
            )
            for seed in placed.seeds
        ]
        draw = images.drawings(exp.graphdef, exp.task, exp.splits.val)
        plain = recorded(cfg)  # interpolations as written: an ${oc.env:...} secret is never stored resolved
        return cls(cfg, plain, fingerprint, manager, early, evaluate, writers, exp.splits.val, draw, num_seeds)

    def on_log(self, step: int, metrics: dict) -> None:
        from cvae_exp.runs import checkpoint

        checkpoint.raise_failed_save(self.manager)  # a write that failed in the background ends the run here
        launch.check_background_writes()
        for i, writer in enumerate(self.writers):
            seed_metrics = seed_values(metrics, i)
            seed_metrics["examples_per_s"] = metrics["examples_per_s"] / self.num_seeds  # this seed's share
            writer.scalars({f"train/{name}": v for name, v in seed_metrics.items()}, step)

    def on_eval(self, step: int, state: dict) -> dict:
        import jax

        from cvae_exp.runs.tensorboard import tile
        from cvae_exp.training import steps

        val = prefixed("val", self.evaluate(state["params"], self.val_split))
        for i, writer in enumerate(self.writers):
            writer.scalars(seed_values(val, i), step)
            if self.cfg.logger.images:
                params = state["params"] if self.num_seeds == 1 else steps.member(state["params"], i)
                key = self.evaluate.key if self.num_seeds == 1 else self.evaluate.key[i]
                for tag, grid in self.draw(params, jax.random.fold_in(key, step)).items():
                    writer.image(tag, tile(grid), step)
        summary = summarize(val)
        log.info("step %d: %s", step, ", ".join(f"{name}={summary[name]:.3f}" for name in val))
        return summary

    def on_checkpoint(self, step: int, state: dict, val: dict) -> None:
        from cvae_exp.runs import checkpoint

        if self.cfg.checkpoint.enabled:  # with K seeds, "best" ranks by the mean val/elbo over the seeds
            meta = {"step": step, "config": self.plain, "data": self.data, **val, "early_stopping": self.early.state()}
            checkpoint.save(self.manager, step, state, meta)

    def flush(self) -> None:
        for writer in self.writers:
            writer.flush()

    def close(self, per_seed: list[dict] | None = None) -> None:
        """Closes the writers, after each seed's hparams summary when the run finished (`per_seed`).
        The same metric names in every job, whatever its model kind, so the HPARAMS view compares them all;
        a sweep's swept keys first."""
        from cvae_exp.runs.tensorboard import hparams_first, swept_keys

        swept = swept_keys()
        run_hparams = hparams_first(hparams(self.plain), swept)
        differs = swept + (["seed"] if self.num_seeds > 1 else [])  # one TensorBoard run per seed
        for i, writer in enumerate(self.writers):
            if per_seed is not None:
                result = per_seed[i]
                writer.hparams(
                    run_hparams | {"seed": result["seed"]},
                    {
                        f"{split}/{name}": result.get(f"{split}/{name}", math.nan)
                        for split in ("val", "test")
                        for name in ("elbo", "kl", "recon")
                    },
                    differs=differs,
                )
            writer.close()


def _fit(cfg: DictConfig, exp, placed, state: dict, target, hooks: _Hooks, manager) -> tuple[dict, dict, int | None]:
    """Trains from `state` to trainer.max_steps (or early stopping, or a stop request); returns the state,
    the last validation summary and the signal that stopped the loop (None: it finished). A NaN stop names
    the last checkpoint that verifies."""
    from cvae_exp.runs import checkpoint
    from cvae_exp.training import loop, steps

    train = cfg.trainer
    train_step = steps.make_train_step(
        exp.graphdef, exp.opt, exp.task, placed.state_sharding, train.num_seeds, placed.feed
    )
    cadence = loop.Loop(
        max_steps=train.max_steps,
        log_every=train.log_every,
        eval_every=train.eval_every,
        checkpoint_every=cfg.checkpoint.every,
        batch_size=train.batch_size,
        nan_policy=train.nan_policy,
        progress=train.progress,
        seeds=train.num_seeds,
        early_stop=hooks.early,
        skip_limit=train.skip_limit,
        on_log=hooks.on_log,
        on_eval=hooks.on_eval,
        on_checkpoint=hooks.on_checkpoint,
    )
    try:
        state, val, stopped = loop.fit(state, train_step, placed.feed, cadence)
    except Interrupted as err:  # while the first step compiled
        raise Interrupted(err.signum, launch.startup_message(err.signum)) from None
    except (loop.NonFinite, loop.TooManySkipped) as err:
        manager.wait_until_finished()
        good = checkpoint.newest_good_before(manager, target, err.step)
        raise UserError(
            f"{err} Training stopped; the last good checkpoint is "
            + (
                f"step {good} in {manager.directory}."
                if good is not None
                else "none (no checkpoint before it verifies)."
            )
        ) from None
    finally:
        manager.wait_until_finished()  # Orbax saves are async: the last one must land before exit
        hooks.flush()
    return state, val, stopped


def _stop_if_signalled(cfg, run_dir: Path, state, stopped: int | None, hooks: _Hooks, manager, signals) -> None:
    """After the loop: a stop request ends the command with 128 + its signal (the run did not finish, so
    `cvae-train && cvae-eval` or a scheduler's afterok dependency must not treat it as done); a signal from
    here on, during the final evaluation, names the checkpoint it leaves."""
    from cvae_exp.training import loop

    step = loop.current_step(state)
    last = f"the checkpoint at step {step}" if cfg.checkpoint.enabled else "no checkpoint"
    signals.after_training = (
        "Stopped by {signal} after training, during the final evaluation, with "
        + last
        + f" written: cvae-train hydra.run.dir={run_dir} resume=true evaluates it and writes metrics.json."
    )
    if not stopped:
        return
    manager.close()
    hooks.close()
    saved = f"the checkpoint {manager.directory / str(step)}" if cfg.checkpoint.enabled else "no checkpoint"
    log.warning(
        "Stopped by %s at step %d with %s written. Continue with: cvae-train hydra.run.dir=%s resume=true",
        signal.Signals(stopped).name,
        step,
        saved,
        run_dir,
    )
    raise SystemExit(128 + stopped)


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
