"""One training run, top to bottom: checks → devices → data → model and optimizer → restore → loop
→ final evaluation. `cvae_exp.train` calls `run_training` after Hydra has composed the config."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cvae_exp import launch
from cvae_exp.config import RESUME, check_keys, check_targets, resume_mode, validate
from cvae_exp.data import sources
from cvae_exp.errors import Interrupted, UserError
from cvae_exp.rundir import RunLock, current_run_dir

log = logging.getLogger("cvae_exp")


def run_training(cfg: DictConfig) -> dict:
    launch.begin()
    with launch.Interruptible() as signals:  # SIGTERM/SIGINT before the loop: exit 143/130, nothing trained
        # ---- checks: every config value and the data path, before anything slow happens
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
        run_dir = current_run_dir()
        # One lock per run: in a multi-process run every process shares the directory; process 0 holds it.
        with RunLock(run_dir) if _primary_process(cfg) else contextlib.nullcontext():
            return _train(cfg, run_dir, mode, signals)


def _primary_process(cfg: DictConfig) -> bool:
    """Whether this is process 0 of its run, known before JAX's distributed runtime starts."""
    if cfg.cluster.process_id is not None:
        return cfg.cluster.process_id == 0
    return os.environ.get("SLURM_PROCID", "0") == "0"


def _train(cfg: DictConfig, run_dir: Path, mode: str, signals: launch.Interruptible) -> dict:
    from cvae_exp import parallel

    _share_accelerator_between_jobs()
    parallel.initialize_distributed(cfg.cluster)  # before any other JAX call

    import jax

    from cvae_exp import checkpoint, loop, resume, steps
    from cvae_exp.data import feed as feeds
    from cvae_exp.runs import build_experiment
    from cvae_exp.tensorboard import Writer, hparams_first, swept_keys, tile

    launch.watch_background_writes()
    t0 = time.perf_counter()
    # ---- the config: this command's, or (resume) the run's own with the command's overrides on top;
    # a changed shape or data source is refused here, before the slow parts
    resumed = resume.settle(cfg, run_dir, mode)
    cfg = resumed.cfg
    t = cfg.trainer
    k = t.num_seeds
    seeds = list(range(cfg.seed, cfg.seed + k))  # one model per seed, vmapped when k > 1
    plain = OmegaConf.to_container(cfg, resolve=True)

    # ---- devices
    mesh = parallel.make_mesh(t.devices)
    parallel.check_batch("trainer.batch_size", t.batch_size, mesh)
    state_sharding, batch_sharding = parallel.replicated(mesh), parallel.data_sharded(mesh, k)
    eval_sharding = parallel.data_sharded(mesh)  # every seed is evaluated on the same batch
    eval_batch = -(-t.eval_batch_size // mesh.size) * mesh.size
    log.info(
        "Devices: %d (%s), processes: %d; run dir: %s",
        mesh.size,
        jax.devices()[0].platform,
        jax.process_count(),
        run_dir,
    )

    # ---- checkpoints
    if not (run_dir / "checkpoints").exists():
        launch.created(run_dir / "checkpoints")  # removed again if this launch is refused
    manager = checkpoint.make_manager(run_dir, cfg.checkpoint.keep)
    if mode == "false" and manager.all_steps():
        raise UserError(
            f"{run_dir} already holds checkpoints (newest step {manager.latest_step()}); "
            "pass resume=true to continue it, or choose another hydra.run.dir."
        )

    # ---- data, model and optimizer
    exp = build_experiment(cfg)
    splits, task, graphdef, opt = exp.splits, exp.task, exp.graphdef, exp.opt
    feed = feeds.make_feed(splits.train, t.batch_size, seeds, state_sharding, batch_sharding, t.data_on_device)
    # What a checkpoint records it was trained on; a resume on other data is refused (resume_data_change).
    data = {"source": exp.source, **{name: len(getattr(splits, name).images) for name in ("train", "val", "test")}}
    log.info("Data: %s; train %d, val %d, test %d", exp.source, data["train"], data["val"], data["test"])
    resume.check_data(resumed, data)
    state = jax.device_put(exp.initial_state(seeds), state_sharding)
    target = checkpoint.abstract(state)

    # ---- restore (verified), then the run is accepted: its record and its log go to disk
    resumed_from = None
    early = loop.EarlyStopping(t.patience, t.min_delta)
    if resumed.saved is not None:
        restored = checkpoint.restore_newest(manager, target)  # raises when none restores and verifies
        checkpoint.set_aside(manager, restored.damaged)  # so that their steps can be saved again
        resumed_from, state = restored.step, restored.state
        early.load(restored.meta.get("early_stopping"))
        log.info("Resumed from step %d in %s", resumed_from, manager.directory)
    signals.check()  # a signal during start-up that a library swallowed
    launch.accept(run_dir, cfg, resumed.overrides, resumed.choices, write_record=jax.process_index() == 0)

    # ---- steps, writer, loop
    train_step = steps.make_train_step(graphdef, opt, task, state_sharding, k, feed)
    eval_step = steps.make_eval_step(graphdef, task, state_sharding, k)
    eval_key = steps.eval_keys(cfg.seed, k)
    # One TensorBoard run per seed: <run dir>/tb, or <run dir>/tb/seed_<s> for each of k > 1 seeds.
    writers = [
        Writer(run_dir, enabled=cfg.logger.tensorboard, resume_step=resumed_from, name=f"seed_{s}" if k > 1 else "")
        for s in seeds
    ]
    draw = _image_fns(graphdef, task, splits.val)

    def evaluate(params, split):
        return steps.evaluate(eval_step, params, split, eval_batch, eval_sharding, eval_key)

    def on_log(step, metrics):
        checkpoint.raise_failed_save(manager)  # a write that failed in the background ends the run here
        launch.check_background_writes()
        for i, writer in enumerate(writers):
            seed_metrics = _seed_values(metrics, i)
            seed_metrics["examples_per_s"] = metrics["examples_per_s"] / k  # this seed's share
            writer.scalars({f"train/{name}": v for name, v in seed_metrics.items()}, step)

    def on_eval(step, state):
        val = {f"val/{name}": v for name, v in evaluate(state["params"], splits.val).items()}
        for i, writer in enumerate(writers):
            writer.scalars(_seed_values(val, i), step)
            if cfg.logger.images:
                params = state["params"] if k == 1 else steps.member(state["params"], i)
                key = eval_key if k == 1 else eval_key[i]
                for tag, grid in draw(params, jax.random.fold_in(key, step)).items():
                    writer.image(tag, tile(grid), step)
        summary = _summary(val)
        log.info("step %d: %s", step, ", ".join(f"{name}={summary[name]:.3f}" for name in val))
        return summary

    def on_checkpoint(step, state, val):
        if cfg.checkpoint.enabled:  # with k seeds, "best" ranks by the mean val/elbo over the seeds
            meta = {"step": step, "config": plain, "data": data, **val, "early_stopping": early.state()}
            checkpoint.save(manager, step, state, meta)

    cadence = loop.Loop(
        max_steps=t.max_steps,
        log_every=t.log_every,
        eval_every=t.eval_every,
        checkpoint_every=cfg.checkpoint.every,
        batch_size=t.batch_size,
        nan_policy=t.nan_policy,
        progress=t.progress,
        seeds=k,
        early_stop=early,
        skip_limit=t.skip_limit,
        on_log=on_log,
        on_eval=on_eval,
        on_checkpoint=on_checkpoint,
    )
    train_start = time.perf_counter()
    start_step = loop.current_step(state)
    try:
        state, val, stopped = loop.fit(state, train_step, feed, cadence)
    except Interrupted as err:  # while the first step compiled
        raise Interrupted(err.signum, launch.startup_message(err.signum)) from None
    except (loop.NonFinite, loop.TooManySkipped) as err:
        manager.wait_until_finished()
        good = _last_good(manager, target, err.step)
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
        for writer in writers:
            writer.flush()
    steps_run = loop.current_step(state) - start_step
    last = f"the checkpoint at step {loop.current_step(state)}" if cfg.checkpoint.enabled else "no checkpoint"
    signals.after_training = (
        "Stopped by {signal} after training, during the final evaluation, with "
        + last
        + f" written: cvae-train hydra.run.dir={run_dir} resume=true evaluates it and writes metrics.json."
    )
    if stopped:
        manager.close()
        for writer in writers:
            writer.close()
        step = loop.current_step(state)
        saved = f"the checkpoint {manager.directory / str(step)}" if cfg.checkpoint.enabled else "no checkpoint"
        log.warning(
            "Stopped by %s at step %d with %s written. Continue with: cvae-train hydra.run.dir=%s resume=true",
            signal.Signals(stopped).name,
            step,
            saved,
            run_dir,
        )
        # 128 + signal number, the shell's code for "terminated by a signal": the run did not finish, so
        # `cvae-train && cvae-eval` or a scheduler's afterok dependency must not treat it as done.
        raise SystemExit(128 + stopped)

    # ---- final evaluation and metrics.json
    if steps_run == 0:  # a finished run resumed once more: report it as it stands
        val = _summary({f"val/{name}": v for name, v in evaluate(state["params"], splits.val).items()})
    test = {f"test/{name}": v for name, v in evaluate(state["params"], splits.test).items()}
    previous = _read_json(run_dir / "metrics.json")
    train_s = time.perf_counter() - train_start
    per_seed = _per_seed_results(state, val, test, seeds)
    metrics = {
        "step": loop.current_step(state),
        **{name: v for name, v in val.items() if name != "per_seed"},
        **_summary(test, per_seed=False),
        "devices": mesh.size,
        "processes": jax.process_count(),
        # all seeds together
        "examples_per_s": steps_run * t.batch_size * k / train_s if steps_run else previous.get("examples_per_s"),
        "skipped_steps": sum(r["skipped_steps"] for r in per_seed),
        "params_sha256": per_seed[0]["params_sha256"],
        "wall_s": time.perf_counter() - t0,
        "data_source": exp.source,
        "train_examples": len(splits.train.images),
        # early stopping (trainer.patience): whether it ended the run, and the step of the best val/elbo
        "stopped_early": early.done,
        "best_step": early.best_step,
        "hardware": f"{mesh.size} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), {os.cpu_count()} CPU cores",
    }
    if k > 1:  # top-level values are means over the seeds; each seed's own values here
        metrics |= {"num_seeds": k, "seeds": per_seed}
    # The same metric names in every job, whatever its model kind, so the HPARAMS view compares them all.
    hparams = hparams_first(_flat(plain, ("model", "data", "optimizer", "trainer", "seed")), swept_keys())
    for writer, result in zip(writers, per_seed, strict=True):
        writer.hparams(
            hparams | {"seed": result["seed"]},
            {
                f"{split}/{name}": result.get(f"{split}/{name}", math.nan)
                for split in ("val", "test")
                for name in ("elbo", "kl", "recon")
            },
        )
        writer.close()
    manager.close()
    launch.check_background_writes()
    if jax.process_index() == 0:
        (run_dir / "metrics.json").write_text(json.dumps(_strict(metrics), indent=2) + "\n")
    log.info("Done: %s", json.dumps(metrics))
    return metrics


def _last_good(manager, target, below: int) -> int | None:
    """The newest checkpoint before step `below` that restores and verifies (damaged ones set aside)."""
    from cvae_exp import checkpoint

    steps = sorted((s for s in manager.all_steps() if s < below), reverse=True)
    try:
        restored = checkpoint.restore_first(manager, target, steps)
    except UserError:  # none of them verifies
        return None
    if restored is None:
        return None
    checkpoint.set_aside(manager, restored.damaged)
    return restored.step


def _seed_values(metrics: dict, i: int) -> dict:
    """Seed i's values from metrics that are floats (one seed) or per-seed arrays."""
    import numpy as np

    return {name: float(np.asarray(v)[i]) if np.ndim(v) else float(v) for name, v in metrics.items()}


def _summary(metrics: dict, per_seed: bool = True) -> dict:
    """Floats: a single run's values, or the mean over the seeds (plus each seed's under "per_seed")."""
    import numpy as np

    out = {name: float(np.mean(v)) for name, v in metrics.items()}
    if per_seed and any(np.ndim(v) for v in metrics.values()):
        out["per_seed"] = {name: [float(x) for x in v] for name, v in metrics.items()}
    return out


def _per_seed_results(state, val: dict, test: dict, seeds: list[int]) -> list[dict]:
    """Each seed's final values, parameters' hash and skipped steps, for metrics.json."""
    import jax
    import numpy as np

    from cvae_exp import steps

    val = val.get("per_seed", val)
    skipped = np.asarray(jax.device_get(state["nonfinite"])).reshape(-1)
    results = []
    for i, seed in enumerate(seeds):
        params = state["params"] if len(seeds) == 1 else steps.member(state["params"], i)
        results.append(
            {
                "seed": seed,
                **_seed_values(val, i),
                **_seed_values(test, i),
                "skipped_steps": int(skipped[i]),
                "params_sha256": steps.params_sha256(params),
            }
        )
    return results


def _share_accelerator_between_jobs() -> None:
    """Jobs of the joblib launcher run side by side on one machine: none may preallocate the GPU."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and "Joblib" in str(HydraConfig.get().launcher.get("_target_", "")):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return {}


def _strict(metrics: dict) -> dict:
    """NaN and infinities as null: metrics.json stays strict JSON whatever the run went through."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def _image_fns(graphdef, task, val_split):
    """Jitted drawings for TensorBoard at each evaluation: reconstructions and samples (or completions)."""
    import jax

    from cvae_exp import images

    few = {"image": val_split.images[:8], "label": val_split.labels[:8]}
    recon = jax.jit(lambda p, k: images.reconstructions(graphdef, p, few, k, task=task))
    if task.condition == "quadrants":
        second = ("val/completions", jax.jit(lambda p, k: images.completions(graphdef, p, few, k, task=task)))
    else:
        second = ("val/samples", jax.jit(lambda p, k: images.class_samples(graphdef, p, k, task=task)))

    def draw(params, key):
        out = (
            {"val/reconstructions": recon(params, key).swapaxes(0, 1)} if task.kind not in ("gsnn", "baseline") else {}
        )
        out[second[0]] = second[1](params, key)
        return jax.device_get(out)

    return draw


def _flat(tree: dict, keys: tuple[str, ...], prefix: str = "") -> dict:
    """Dotted keys for the hparams summary, for the groups a sweep varies."""
    out = {}
    for k, v in tree.items():
        if prefix == "" and k not in keys:
            continue
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, keys, f"{name}."))
        else:
            out[name] = v
    return out
