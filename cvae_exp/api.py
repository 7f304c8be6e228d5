"""The Python API, for notebooks and scripts: the same config as the command line (Hydra composes it from the
same conf/ with the same overrides), the same checks and the same run directory; a user error raises
`cvae_exp.errors.UserError` carrying its one sentence instead of exiting the interpreter.

    from cvae_exp import api
    metrics = api.train(["model=vae", "data.condition=none", "trainer.max_steps=2000"], run_dir="outputs/vae")
    result = api.evaluate("outputs/vae", ["eval.samples=1000"])
    files = api.sample("outputs/vae")
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cvae_exp.cli import CONF_DIR, console
from cvae_exp.errors import Interrupted, UserError


def train(overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> dict:
    """Trains (or, with "resume=true", continues) the run that `cvae-train <overrides>` would, in `run_dir`
    (default: a new outputs/<date>/<time>), and returns its metrics.json as a dict."""
    from cvae_exp.runs.job import run_training

    where = [f"hydra.run.dir={Path(run_dir).absolute()}"] if run_dir is not None else []
    return _run("config", "train", [*overrides, *where], run_training)


def evaluate(run_dir: str | Path, overrides: Sequence[str] = ()) -> dict:
    """`cvae-eval run_dir=<run_dir> <overrides>`: the result it writes to eval.json, as a dict."""
    from cvae_exp import evaluate as command

    return _run("eval", "evaluate", [f"run_dir={Path(run_dir).absolute()}", *overrides], command.run)


def sample(run_dir: str | Path, overrides: Sequence[str] = ()) -> list[Path]:
    """`cvae-sample run_dir=<run_dir> <overrides>`: the PNG files it wrote."""
    from cvae_exp import sample as command

    return _run("sample", "sample", [f"run_dir={Path(run_dir).absolute()}", *overrides], command.run)


def _run(config_name: str, job_name: str, overrides: list[str], task: Callable[[Any], Any]) -> Any:
    """Runs `task` on the composed config as Hydra's own `@hydra.main` does (Hydra.run: the run directory,
    the callbacks, the job's log) and returns what it returns; its exception is raised here."""
    from hydra import initialize_config_dir
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import JobStatus, run_job
    from hydra.types import HydraContext, RunMode

    GlobalHydra.instance().clear()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # Hydra's job logging replaces them: put back after
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=job_name):
            hydra = GlobalHydra.instance().hydra
            cfg = hydra.compose_config(config_name, list(overrides), run_mode=RunMode.RUN, with_log_configuration=True)
            cfg.hydra.mode = RunMode.RUN
            callbacks = Callbacks(cfg)
            callbacks.on_run_start(config=cfg, config_name=config_name)
            context = HydraContext(config_loader=hydra.config_loader, callbacks=callbacks)
            ret = run_job(
                hydra_context=context,
                task_function=_guarded(task),
                config=cfg,
                job_dir_key="hydra.run.dir",
                job_subdir_key=None,
            )
            callbacks.on_run_end(config=cfg, config_name=config_name, job_return=ret)
    except Exception as err:
        if type(err).__module__.startswith(("hydra", "omegaconf")):  # a mistyped key, a bad override
            raise UserError(" ".join(line.strip() for line in str(err).splitlines() if line.strip())) from None
        raise
    finally:
        GlobalHydra.instance().clear()
        _restore_logging(handlers, level)
    if ret.status == JobStatus.FAILED:  # raised as it is (JobReturn.return_value would print a line first)
        raise ret._return_value
    return ret.return_value


def _restore_logging(handlers: list[logging.Handler], level: int) -> None:
    """The caller's root logging as it was: the run's own handlers (its log file) closed and removed."""
    root = logging.getLogger()
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def _guarded(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The task with the console set up; a refused or interrupted command removes what it created (as the
    command line's cvae_exp.cli.exit_on_user_error does) and raises."""

    @functools.wraps(task)
    @console
    def run(cfg):
        try:
            return task(cfg)
        except (UserError, Interrupted):
            from cvae_exp.runs import launch

            launch.discard()
            raise

    return run
