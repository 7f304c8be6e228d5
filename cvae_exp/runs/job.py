"""One `cvae-train` run: the pre-flight, its directory held, then a group of one job (cvae_exp.runs.group).
`cvae_exp.train` calls `run_training` after Hydra has composed the config. JAX is imported only once the
checks have passed (a refused command starts no runtime)."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from cvae_exp.runs import launch, preflight
from cvae_exp.runs.rundir import RunLock, check_not_nested, current_run_dir

log = logging.getLogger("cvae_exp")


def run_training(cfg: DictConfig) -> dict:
    """Trains the run `cfg` describes in Hydra's run directory and returns what it writes to metrics.json."""
    launch.begin()
    with launch.Interruptible() as signals:  # SIGTERM/SIGINT before the loop: exit 143/130, nothing trained
        run_dir = current_run_dir()
        check_not_nested(run_dir)  # no run inside another's checkpoints, where its keep policy deletes
        mode = preflight.mode_of(cfg)
        resumed = preflight.check_run(cfg, run_dir, mode)
        # One lock per run: in a multi-process run every process shares the directory; process 0 holds it.
        with RunLock(run_dir) if _primary_process(cfg) else contextlib.nullcontext():
            return _train(resumed, run_dir, signals)


def _train(resumed, run_dir: Path, signals: launch.Interruptible) -> dict:
    _start_runtime(resumed.cfg)
    import jax

    from cvae_exp.runs import group

    cfg = resumed.cfg
    log.info("Devices: %s, processes: %d; run dir: %s", _devices(cfg), jax.process_count(), run_dir)

    def accept() -> None:
        launch.accept(run_dir, cfg, resumed.overrides, resumed.choices, write_record=jax.process_index() == 0)

    spec = group.JobSpec(cfg, run_dir, resumed.saved, accept)
    how = group.Launch(
        swept=launch.multirun_swept_keys(),
        stop_message=lambda name, step: _stop_message(cfg, run_dir, name, step),
        after_training=lambda step: _after_training(cfg, run_dir, step),
        signals=signals,
    )
    group.train_group([spec], how)
    group.refuse_if_failed(spec)
    return spec.metrics


def _devices(cfg: DictConfig) -> str:
    import jax

    from cvae_exp.training.experiment import training_mesh

    return f"{training_mesh(cfg).size} ({jax.devices()[0].platform})"


def _stop_message(cfg: DictConfig, run_dir: Path, name: str, step: int) -> str:
    saved = f"the checkpoint {run_dir / 'checkpoints' / str(step)}" if cfg.checkpoint.enabled else "no checkpoint"
    return f"Stopped by {name} at step {step} with {saved} written. Continue with: cvae-train hydra.run.dir={run_dir} resume=true"


def _after_training(cfg: DictConfig, run_dir: Path, step: int) -> str:
    last = f"the checkpoint at step {step}" if cfg.checkpoint.enabled else "no checkpoint"
    return (
        "Stopped by {signal} after training, during the final evaluation, with "
        + last
        + f" written: cvae-train hydra.run.dir={run_dir} resume=true evaluates it and writes metrics.json."
    )


def _primary_process(cfg: DictConfig) -> bool:
    """Whether this is process 0 of its run, known before JAX's distributed runtime starts."""
    if cfg.cluster.process_id is not None:
        return cfg.cluster.process_id == 0
    return os.environ.get("SLURM_PROCID", "0") == "0"


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
