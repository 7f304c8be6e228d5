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

from cvae_exp.config import check_targets, resume_mode, validate
from cvae_exp.data import sources
from cvae_exp.errors import UserError
from cvae_exp.rundir import RunLock, current_run_dir

log = logging.getLogger("cvae_exp")


def run_training(cfg: DictConfig) -> dict:
    # ---- checks: every config value and the data path, before anything slow happens
    validate(cfg)
    sources.check_path(cfg.data.path)
    check_targets(cfg)  # imports optax (and JAX): after the checks that need nothing
    run_dir = current_run_dir()
    # One lock per run: in a multi-process run every process shares the directory; process 0 holds it.
    with RunLock(run_dir) if _primary_process(cfg) else contextlib.nullcontext():
        return _train(cfg, run_dir)


def _primary_process(cfg: DictConfig) -> bool:
    """Whether this is process 0 of its run, known before JAX's distributed runtime starts."""
    if cfg.cluster.process_id is not None:
        return cfg.cluster.process_id == 0
    return os.environ.get("SLURM_PROCID", "0") == "0"


def _train(cfg: DictConfig, run_dir: Path) -> dict:
    from cvae_exp import parallel

    _share_accelerator_between_jobs()
    parallel.initialize_distributed(cfg.cluster)  # before any other JAX call

    import jax

    from cvae_exp import checkpoint, trainer
    from cvae_exp.data.pipeline import BatchSampler
    from cvae_exp.logging import Writer, tile
    from cvae_exp.runs import build_experiment

    t0 = time.perf_counter()
    t = cfg.trainer
    plain = OmegaConf.to_container(cfg, resolve=True)

    # ---- devices
    mesh = parallel.make_mesh(t.devices)
    parallel.check_batch("trainer.batch_size", t.batch_size, mesh)
    state_sharding, batch_sharding = parallel.replicated(mesh), parallel.data_sharded(mesh)
    eval_batch = -(-t.eval_batch_size // mesh.size) * mesh.size
    log.info(
        "Devices: %d (%s), processes: %d; run dir: %s",
        mesh.size,
        jax.devices()[0].platform,
        jax.process_count(),
        run_dir,
    )

    # ---- checkpoints: decide between fresh and resumed before the slow parts
    manager = checkpoint.make_manager(run_dir, cfg.checkpoint.keep)
    mode = resume_mode(cfg)
    if mode == "false" and "SLURM_JOB_ID" in os.environ:
        # A preempted SLURM job is resubmitted with the same command: it must pick up its own checkpoints.
        mode = "auto"
    if mode == "false" and manager.all_steps():
        raise UserError(
            f"{run_dir} already holds checkpoints (newest step {manager.latest_step()}); "
            "pass resume=true to continue it, or choose another hydra.run.dir."
        )
    if mode in ("true", "auto") and (saved := checkpoint.newest_config(manager)):
        # Before the data and the model: what the arrays' shapes depend on must not have changed.
        changed = checkpoint.changed_shape_keys(saved[1], plain)
        if changed:
            raise UserError(
                f"The checkpoint at step {saved[0]} in {manager.directory} was trained with different "
                f"{', '.join(changed)}; resume it with the same values or start a new run directory."
            )

    # ---- data, model and optimizer
    exp = build_experiment(cfg)
    splits, task, graphdef, opt = exp.splits, exp.task, exp.graphdef, exp.opt
    sampler = BatchSampler(splits.train, t.batch_size, cfg.seed)
    log.info(
        "Data: %s; train %d, val %d, test %d",
        exp.source,
        len(splits.train.images),
        len(splits.val.images),
        len(splits.test.images),
    )
    state = jax.device_put(exp.init_state(cfg.seed), state_sharding)

    # ---- restore
    resumed_from = None
    if mode in ("true", "auto"):
        restored = checkpoint.restore_newest(manager, checkpoint.abstract(state))
        if restored is None and mode == "true":
            log.warning("resume=true, but %s holds no checkpoint yet: starting fresh.", run_dir / "checkpoints")
        if restored is not None:
            resumed_from, state, _ = restored
            checkpoint.set_aside_newer(manager, resumed_from)  # damaged ones, so their steps can be saved again
            log.info("Resumed from step %d in %s", resumed_from, manager.directory)

    # ---- steps, writer, loop
    train_step = trainer.make_train_step(graphdef, opt, task, state_sharding)
    eval_step = trainer.make_eval_step(graphdef, task, state_sharding)
    eval_key = jax.random.key(cfg.seed + 7919)
    writer = Writer(run_dir, enabled=cfg.logger.tensorboard, resume_step=resumed_from)
    draw = _image_fns(graphdef, task, splits.val)

    def on_log(step, metrics):
        writer.scalars({f"train/{k}": v for k, v in metrics.items()}, step)

    def on_eval(step, state):
        val = trainer.evaluate(eval_step, state["params"], splits.val, eval_batch, batch_sharding, eval_key)
        val = {f"val/{k}": v for k, v in val.items()}
        writer.scalars(val, step)
        if cfg.logger.images:
            for tag, stack in draw(state["params"], jax.random.fold_in(eval_key, step)).items():
                writer.image(tag, tile(stack), step)
        log.info("step %d: %s", step, ", ".join(f"{k}={v:.3f}" for k, v in val.items()))
        return val

    def on_checkpoint(step, state, val):
        if cfg.checkpoint.enabled:
            checkpoint.save(manager, step, state, {"step": step, "config": plain, **val})

    loop = trainer.Loop(
        max_steps=t.max_steps,
        log_every=t.log_every,
        eval_every=t.eval_every,
        checkpoint_every=cfg.checkpoint.every,
        batch_size=t.batch_size,
        nan_policy=t.nan_policy,
        progress=t.progress,
        on_log=on_log,
        on_eval=on_eval,
        on_checkpoint=on_checkpoint,
    )
    train_start = time.perf_counter()
    start_step = int(state["step"])
    try:
        state, val, stopped = trainer.fit(state, train_step, sampler, batch_sharding, loop)
    except trainer.NonFinite as err:
        manager.wait_until_finished()
        good = [s for s in manager.all_steps() if s < err.step]
        raise UserError(
            f"{err} Training stopped; the last good checkpoint is "
            + (f"step {max(good)} in {manager.directory}." if good else "none (no checkpoint was saved before it).")
        ) from None
    finally:
        manager.wait_until_finished()  # Orbax saves are async: the last one must land before exit
        writer.flush()
    steps_run = int(state["step"]) - start_step
    if stopped:
        manager.close()
        writer.close()
        step = int(state["step"])
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
        val = {
            f"val/{k}": v
            for k, v in trainer.evaluate(
                eval_step, state["params"], splits.val, eval_batch, batch_sharding, eval_key
            ).items()
        }
    test = trainer.evaluate(eval_step, state["params"], splits.test, eval_batch, batch_sharding, eval_key)
    previous = _read_json(run_dir / "metrics.json")
    train_s = time.perf_counter() - train_start
    metrics = {
        "step": int(state["step"]),
        **val,
        **{f"test/{k}": v for k, v in test.items()},
        "devices": mesh.size,
        "processes": jax.process_count(),
        "examples_per_s": steps_run * t.batch_size / train_s if steps_run else previous.get("examples_per_s"),
        "skipped_steps": int(state["nonfinite"]),
        "params_sha256": trainer.params_sha256(state["params"]),
        "wall_s": time.perf_counter() - t0,
        "data_source": exp.source,
        "train_examples": len(splits.train.images),
        "hardware": f"{mesh.size} x {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), {os.cpu_count()} CPU cores",
    }
    # The same metric names in every job, whatever its model kind, so the HPARAMS view compares them all.
    writer.hparams(
        _flat(plain, ("model", "data", "optimizer", "trainer", "seed")),
        {
            f"{split}/{k}": metrics.get(f"{split}/{k}", math.nan)
            for split in ("val", "test")
            for k in ("elbo", "kl", "recon")
        },
    )
    writer.close()
    manager.close()
    if jax.process_index() == 0:
        (run_dir / "metrics.json").write_text(json.dumps(_strict(metrics), indent=2) + "\n")
    log.info("Done: %s", json.dumps(metrics))
    return metrics


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
