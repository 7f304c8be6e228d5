"""`cvae-train`: compose the config, build the run, fit, write metrics.json.

cvae-train model=cvae optimizer.lr=3e-4 trainer.max_steps=2000 data.path=/data/mnist seed=1
cvae-train -m sweep=latent_dim
cvae-train hydra.run.dir=<run dir> resume=true
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cvae_exp.cli import CONF_DIR, console, exit_on_user_error, no_wait_after_storage_failure


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
