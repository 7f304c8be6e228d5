"""The Launcher: Hydra hands it every job of a multirun at once; cvae_exp.runs.vmap_sweep trains them in groups."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class VmapLauncher(Launcher):
    def __init__(self, max_members: Optional[int] = None) -> None:
        self.max_members = max_members
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from cvae_exp.cli import exit_on_user_error, quiet_console  # a refused sweep: one sentence, exit 2
        from cvae_exp.runs import vmap_sweep

        vmap_sweep.configure_console(self)
        with quiet_console(shown=bool(self.config.get("verbose", False))):  # as every command's console
            return exit_on_user_error(vmap_sweep.launch_sweep)(self, job_overrides, initial_job_idx)
