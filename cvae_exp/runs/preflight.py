"""The one pre-flight of a job: every check that can refuse it, once, before anything is written or loaded.

`check_run(cfg, run_dir, mode)` is called once per job by cvae-train (cvae_exp.runs.job) and by the vmap
launcher (cvae_exp.runs.vmap_sweep, for every job of the sweep before any is trained): the keys, the resume
mode, the config it trains (a resumed run's own, with the command's overrides on top), the values, the data
path, the optimizer's targets, the rules of a resume (shapes, data), and a fresh run into a directory that
already holds checkpoints. The layers below trust what it checked: they do not check again.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from cvae_exp.config import RESUME, check_data_path, check_keys, check_targets, resume_mode, validate
from cvae_exp.errors import UserError
from cvae_exp.runs import resume


def mode_of(cfg: DictConfig, default_auto: bool = False) -> str:
    """The resume mode of this launch: `resume`, read as auto where a relaunch must pick up its own
    checkpoints (a preempted SLURM job is resubmitted with the same command; a vmap sweep is relaunched)."""
    check_keys(cfg)
    mode = resume_mode(cfg)
    if mode not in RESUME:
        raise UserError(f"resume={mode} is not one of {', '.join(RESUME)}.")
    if mode == "false" and (default_auto or "SLURM_JOB_ID" in os.environ):
        mode = "auto"
    return mode


def check_run(cfg: DictConfig, run_dir: Path, mode: str, merge: bool = True) -> resume.Resumed:
    """The config the job in `run_dir` trains, checked; refuses with one sentence naming the key or file.
    `merge`: a resumed run trains its own saved config with the command's overrides on top (cvae-train);
    without it, `cfg` as given (a vmap sweep's job, which its sweep defines)."""
    if mode == "false":
        validate(cfg)  # a fresh run: its own config, checked before anything is read from disk
        _refuse_existing_checkpoints(run_dir)
    if merge:
        resumed = resume.settle(cfg, run_dir, mode)
    else:
        resumed = resume.Resumed(cfg, resume.saved_run(run_dir) if mode != "false" else None)
        if resumed.saved is None and mode == "true":
            raise UserError(
                f"resume=true, but {run_dir / 'checkpoints'} holds no checkpoint: there is nothing to resume."
            )
    if mode != "false":
        validate(resumed.cfg)
    check_data_path(resumed.cfg)
    check_targets(resumed.cfg)  # imports optax (and JAX): after the checks that need nothing
    resume.check_resumable(resumed, run_dir)
    return resumed


def _refuse_existing_checkpoints(run_dir: Path) -> None:
    """A fresh run (resume=false) never writes into a directory that holds checkpoints."""
    folder = run_dir / "checkpoints"
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
    if steps:
        raise UserError(
            f"{run_dir} already holds checkpoints (newest step {steps[-1]}); "
            "pass resume=true to continue it, or choose another hydra.run.dir."
        )
