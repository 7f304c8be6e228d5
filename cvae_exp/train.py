"""`cvae-train`: compose the config, build the run, fit, write metrics.json.

cvae-train model=cvae optimizer.lr=3e-4 trainer.max_steps=2000 data.path=/data/mnist seed=1
cvae-train -m sweep=latent_dim
cvae-train hydra.run.dir=<run dir> resume=true
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cvae_exp.config import register_configs
from cvae_exp.errors import UserError

log = logging.getLogger("cvae_exp")
logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save and restore at INFO
# The configs: cvae_exp/conf in an installed package (pyproject maps the repository's conf/ there), the
# repository's conf/ beside the package in a checkout or an editable install (as `make` does).
_PACKAGE = Path(__file__).resolve().parent
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"
register_configs()


def train(cfg: DictConfig) -> float:
    """Trains one run as configured and returns its final val/elbo (what sweepers minimise)."""
    from cvae_exp.run import run_training  # JAX loads only after the config has been accepted

    return run_training(cfg).get("val/elbo", float("nan"))


def exit_on_user_error(fn):
    """Runs an entry point; a UserError becomes one sentence on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapped


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@exit_on_user_error
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
