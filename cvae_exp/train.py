"""`cvae-train`: compose the config, build the run, fit, write metrics.json.

cvae-train model=cvae optimizer.lr=3e-4 trainer.max_steps=2000 data.path=/data/mnist seed=1
cvae-train -m sweep=latent_dim
cvae-train hydra.run.dir=<run dir> resume=true
"""

from __future__ import annotations

import os
import sys

from cvae_exp import stop_signals

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "cvae-train":  # the command, not an import of it
    stop_signals.hold_from_start()  # a stop signal from here on is noted until the run can act on it

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from cvae_exp.cli import CONF_DIR, console, exit_on_user_error, no_wait_after_storage_failure  # noqa: E402


def train(cfg: DictConfig) -> float:
    """Trains one run as configured and returns its final val/elbo (what sweepers minimise)."""
    from cvae_exp.runs.job import run_training  # JAX loads only after the config has been accepted

    return run_training(cfg).get("val/elbo", float("nan"))


@no_wait_after_storage_failure
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@exit_on_user_error
@console
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
