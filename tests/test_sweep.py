"""The sweep configs in conf/sweep/: what each sweeps, how they combine with other overrides, and the
Optuna search space (skipped when hydra-optuna-sweeper, an extra of `.[cluster]`, is not installed).

The real multirun through the CLI (`cvae-train sweep=latent_dim model.latent_dim=2,4 seed=0,1`) runs in
tests/test_report.py, whose report needs it anyway. Every sweep's jobs composing and validating is
checked in tests/test_config.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

import cvae_exp.cli  # noqa: F401  (registers the schemas in Hydra's ConfigStore)
from cvae_exp.config import validate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SWEEPS = sorted(p.stem for p in (CONF_DIR / "sweep").glob("*.yaml"))
HAVE_OPTUNA = True
try:
    import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
except ImportError:
    HAVE_OPTUNA = False
BASIC = [s for s in SWEEPS if s != "optuna"]


def make_cfg(overrides=()):
    return compose_config(overrides, hydra_config=True)


def jobs(sweep: str, *cli: str) -> list[list[str]]:
    """The job override lists the basic sweeper makes from `sweep=<sweep> *cli` (the CLI wins on a shared key)."""
    cfg = make_cfg([f"sweep={sweep}", *(o for o in cli if "," not in o)])
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    parsed = OverridesParser.create().parse_overrides(params + list(cli))
    return BasicSweeper.split_arguments(parsed, None)[0]


def values(job: list[str], key: str) -> str:
    return dict(o.split("=", 1) for o in job)[key]


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_files_are_global_multiruns_that_say_how_to_run_them(sweep):
    lines = (CONF_DIR / "sweep" / f"{sweep}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith("# cvae-train ") and f"sweep={sweep}" in lines[1]
    if sweep == "optuna" and not HAVE_OPTUNA:
        pytest.skip("sweep=optuna needs hydra-optuna-sweeper (pip install -e '.[cluster]')")
    cfg = make_cfg([f"sweep={sweep}"])
    assert cfg.hydra.mode == RunMode.MULTIRUN  # `cvae-train sweep=<name>` needs no -m
    assert cfg.hydra.sweeper.params


@pytest.mark.parametrize(
    "sweep, key, expected",
    [
        ("latent_dim", "model.latent_dim", ["2", "8", "20", "50", "200"]),
        ("seeds", "seed", ["0", "1", "2", "3", "4"]),
        ("models", "model", ["vae", "cvae"]),
        ("models_quadrants", "model", ["baseline", "cvae", "gsnn", "hybrid"]),
        ("beta", "model.beta", ["0.25", "0.5", "1.0", "2.0", "4.0"]),
        ("lr", "optimizer.lr", ["0.0001", "0.0003", "0.001", "0.003"]),
    ],
)
def test_each_sweep_makes_one_job_per_value(sweep, key, expected):
    points = jobs(sweep)
    assert [values(j, key) for j in points] == expected


def test_a_sweep_combines_with_a_fixed_override():
    points = jobs("seeds", "model.latent_dim=8")
    assert len(points) == 5
    assert {values(j, "model.latent_dim") for j in points} == {"8"}
    job = make_cfg(["sweep=seeds", *points[3]])
    assert job.seed == 3 and job.model.latent_dim == 8
    validate(job)


def test_a_sweep_combines_with_another_swept_key_and_the_cli_wins_on_its_own_key():
    assert len(jobs("latent_dim", "seed=0,1")) == 10  # 5 latent sizes x 2 seeds
    points = jobs("latent_dim", "model.latent_dim=2,4", "seed=0,1")
    assert [(values(j, "model.latent_dim"), values(j, "seed")) for j in points] == [
        ("2", "0"),
        ("2", "1"),
        ("4", "0"),
        ("4", "1"),
    ]


def test_kl_warmup_goes_with_the_beta_sweep():
    points = jobs("beta", "model.kl_warmup_steps=1000")
    job = make_cfg(["sweep=beta", *points[0]])
    assert job.model.beta == 0.25 and job.model.kl_warmup_steps == 1000
    validate(job)


def test_models_quadrants_sets_the_quadrant_task_for_every_model():
    for point in jobs("models_quadrants"):
        job = make_cfg(["sweep=models_quadrants", *point])
        assert job.data.condition == "quadrants"
        validate(job)


@pytest.mark.skipif(not HAVE_OPTUNA, reason="sweep=optuna needs hydra-optuna-sweeper (pip install -e '.[cluster]')")
def test_optuna_sweep_is_tpe_minimising_with_overridable_trials_and_storage():
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    cfg = make_cfg(["sweep=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert str(sweeper.direction) == "minimize"
    assert set(sweeper.params) == {"optimizer.lr", "model.latent_dim", "model.beta"}

    parser = OverridesParser.create()
    dist = {
        k: create_optuna_distribution_from_override(parser.parse_override(f"{k}={v}"))
        for k, v in sweeper.params.items()
    }
    lr = dist["optimizer.lr"]
    assert (lr.low, lr.high) == (1e-4, 1e-2)
    assert getattr(lr, "log", type(lr).__name__ == "LogUniformDistribution")  # optuna 2: LogUniform; 3: log=True
    assert list(dist["model.latent_dim"].choices) == [2, 8, 20, 50, 200]
    beta = dist["model.beta"]
    assert (beta.low, beta.high) == (0.5, 2.0) and not getattr(beta, "log", False)

    custom = make_cfg(["sweep=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.storage=sqlite:///study.db"])
    assert custom.hydra.sweeper.n_trials == 3
    assert custom.hydra.sweeper.storage == "sqlite:///study.db"
    # A trial's overrides give a valid run config.
    validate(make_cfg(["sweep=optuna", "optimizer.lr=0.003", "model.latent_dim=8", "model.beta=0.7"]))
    assert OmegaConf.select(custom, "hydra.sweeper.sampler.seed") == 0
