"""The real config in conf/ composes with every option, its schemas and `validate` refuse bad input, and the
optimizer group instantiates into a working optax transformation with the documented schedule."""

from __future__ import annotations

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import IMPOSSIBLE
from conftest import compose_config as make_cfg
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import cvae_exp.cli  # noqa: F401  (registers the schemas in Hydra's ConfigStore)
from cvae_exp.config import validate
from cvae_exp.errors import UserError
from cvae_exp.training.optim import Optimizer

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUP_FIELD = {"model": "kind", "data": "name"}  # the field that says which option of a group was chosen


def options(group: str) -> list[str]:
    """The option names of a config group, from the YAML files in conf/<group>/ (new files are picked up)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def sweep_points(params, cfg) -> list[list[str]]:
    """The jobs of a `hydra.sweeper.params` block, as override lists.

    Lists, choice() and range() expand as the basic sweeper expands them; an interval() (Optuna's continuous
    search space) stands for its two end points, which every trial lies between.
    """
    parser = OverridesParser.create()
    axes = []
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        sweep = override.value()
        if isinstance(sweep, IntervalSweep):
            integer = isinstance(OmegaConf.select(cfg, key), int)
            values = [str(int(v)) if integer else repr(float(v)) for v in (sweep.start, sweep.end)]
        else:
            values = list(override.sweep_string_iterator())
        axes.append([f"{key}={v}" for v in values])
    return [list(point) for point in itertools.product(*axes)]


def assert_sweepable(cfg, key: str, where: str) -> None:
    """A swept key is a config group (conf/<key>/) or a value that exists in the composed config."""
    if (CONF_DIR / key).is_dir():
        return
    assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", f"{where} sweeps unknown key {key}"


# ----------------------------------------------------------------------------- every option composes


def test_the_documented_options_exist():
    assert {"cvae", "vae", "gsnn", "hybrid", "baseline"} <= set(options("model"))
    assert {"mnist", "fashion_mnist"} <= set(options("data"))
    assert {"adam", "adamw"} <= set(options("optimizer"))
    assert {"latent_dim", "lr"} <= set(options("sweep"))


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("data", options("data"))
@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_group_options_compose_and_validate(model, data, optimizer):
    cfg = make_cfg([f"model={model}", f"data={data}", f"optimizer={optimizer}"], hydra_config=True)
    assert cfg.model.kind == model
    assert cfg.data.name == data
    assert cfg.optimizer.transform._target_ == f"optax.{optimizer}"
    validate(cfg)
    # Every key the tools rely on is there.
    for key in ("seed", "trainer.max_steps", "trainer.batch_size", "trainer.eval_every", "checkpoint.every", "resume"):
        assert OmegaConf.select(cfg, key) is not None, key
    assert "data" in cfg and "path" in cfg.data


@pytest.mark.parametrize("sweep", options("sweep"))
def test_sweeps_compose_and_every_job_validates(sweep):
    if sweep == "optuna":  # its sweeper comes with the optional extra: pip install -e ".[cluster]"
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = make_cfg([f"sweep={sweep}"], hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params, f"sweep={sweep} sets no hydra.sweeper.params"
    for key in params:
        assert_sweepable(cfg, key, f"sweep={sweep}")
    points = sweep_points(params, cfg)
    assert len(points) > 1
    for point in points:
        validate(make_cfg([f"sweep={sweep}", *point]))


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose_and_every_job_validates(experiment):
    cfg = make_cfg([f"experiment={experiment}"], hydra_config=True)
    validate(cfg)
    params = cfg.hydra.sweeper.params or {}
    for key in params:
        assert_sweepable(cfg, key, f"experiment={experiment}")
    for point in sweep_points(params, cfg):
        job = make_cfg([f"experiment={experiment}", *point])
        validate(job)
        for override in point:  # the job really got the swept value
            key, value = override.split("=", 1)
            if "." in key:
                assert str(OmegaConf.select(job, key)) == value
            elif key in GROUP_FIELD:
                assert job[key][GROUP_FIELD[key]] == value


def test_override_values_reach_the_config():
    cfg = make_cfg(["trainer.max_steps=7", "model.hidden=[3,4]", "optimizer.lr=0.25", "seed=5", "resume=true"])
    assert cfg.trainer.max_steps == 7 and list(cfg.model.hidden) == [3, 4] and cfg.optimizer.lr == 0.25
    assert cfg.seed == 5
    validate(cfg)


# ----------------------------------------------------------------------------- bad input at compose time


@pytest.mark.parametrize(
    "override, named",
    [
        ("trainer.max_stepz=5", "max_stepz"),
        ("model.latent_dimm=3", "latent_dimm"),
        ("trainer.max_steps=abc", "max_steps"),
        ("model.latent_dim=1.5", "latent_dim"),
        ("trainer.progress=sometimes", "progress"),
    ],
)
def test_unknown_key_or_wrong_type_fails_at_compose(override, named):
    with pytest.raises((HydraException, OmegaConfBaseException)) as err:
        make_cfg([override])
    text = str(err.value) + str(getattr(err.value, "__cause__", "") or "")
    assert named in text


def test_unknown_option_fails_at_compose():
    with pytest.raises(HydraException) as err:
        make_cfg(["model=cvea"])
    assert "cvea" in str(err.value)


def test_cli_mistyped_key_exits_nonzero_naming_it(run_cli, tmp_path):
    result = run_cli(["trainer.max_stepz=5", f"hydra.run.dir={tmp_path / 'r'}"])
    assert result.returncode != 0
    assert "max_stepz" in result.stderr + result.stdout
    assert not (tmp_path / "r").exists()  # refused before the run directory was made


def test_cli_unknown_key_added_with_plus_is_refused_by_the_schema(run_cli, tmp_path):
    # Hydra's own message for a mistyped key suggests `+`, and Hydra then accepts the key; the schema does not.
    result = run_cli(["+trainer.max_stepz=5", f"hydra.run.dir={tmp_path / 'r'}"])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: trainer.max_stepz is not a config key (see docs/configuration.md for the keys there are)."]
    assert not (tmp_path / "r").exists()  # Hydra made the folder; the refused launch removed it again


# ----------------------------------------------------------------------------- impossible values

IDS = [o[-1] for o, _ in IMPOSSIBLE]


@pytest.mark.parametrize("overrides, named", IMPOSSIBLE, ids=IDS)
def test_validate_refuses_impossible_values(overrides, named):
    cfg = make_cfg(overrides)  # the types are right: composing succeeds
    with pytest.raises(UserError) as err:
        validate(cfg)
    message = str(err.value)
    assert named in message
    assert "\n" not in message.strip()


def test_validate_accepts_the_defaults_and_the_boundaries():
    validate(make_cfg())
    validate(make_cfg(["model.alpha=0", "model.latent_dim=1", "trainer.batch_size=1", "trainer.eval_every=1"]))
    validate(make_cfg(["model.alpha=1", "data.condition=quadrants", "data.n_given=3"]))


@pytest.mark.parametrize("overrides, named", IMPOSSIBLE, ids=IDS)
def test_cli_impossible_value_exits_2_with_one_line(cli_env, tmp_path, overrides, named):
    # cvae-train's main() in this process (its output captured down to the file descriptors); the two
    # tests above run the CLI as new processes
    from conftest import in_process

    marker = tmp_path / "r"
    result = in_process("cvae_exp.train", [*overrides, f"hydra.run.dir={marker}"], env=cli_env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not marker.exists()  # no run directory left behind: not even the one Hydra made


# ----------------------------------------------------------------------------- the optimizer group


def _quadratic(params):
    return jnp.sum(jnp.square(params["w"] - 3.0)) + jnp.square(params["b"] + 1.0)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_optimizer_instantiates_and_updates_params(optimizer):
    cfg = make_cfg([f"optimizer={optimizer}", "optimizer.lr=0.1", "optimizer.warmup_steps=5"])
    opt = instantiate(cfg.optimizer, total_steps=100)
    assert isinstance(opt, Optimizer)
    assert isinstance(opt.tx, optax.GradientTransformation)
    params = {"w": jnp.zeros((3,)), "b": jnp.zeros(())}
    state = opt.tx.init(params)
    start = float(_quadratic(params))
    step = jax.jit(lambda p, s: _apply(opt.tx, p, s))
    for _ in range(60):
        params, state = step(params, state)
    assert jax.tree.structure(params) == jax.tree.structure({"w": jnp.zeros((3,)), "b": jnp.zeros(())})
    assert float(_quadratic(params)) < 0.1 * start


def _apply(tx, params, state):
    grads = jax.grad(_quadratic)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def test_constant_schedule_is_constant():
    opt = instantiate(make_cfg(["optimizer=adam", "optimizer.lr=0.002"]).optimizer, total_steps=100)
    values = np.array([float(opt.schedule(s)) for s in (0, 1, 50, 99, 100)])
    np.testing.assert_allclose(values, 0.002, rtol=1e-6)


def test_cosine_schedule_warms_up_peaks_and_decays_to_zero():
    lr, warmup, total = 0.003, 20, 200
    cfg = make_cfg(
        ["optimizer=adamw", f"optimizer.lr={lr}", f"optimizer.warmup_steps={warmup}", "optimizer.schedule=cosine"]
    )
    opt = instantiate(cfg.optimizer, total_steps=total)
    at = np.array([float(opt.schedule(s)) for s in range(total + 1)])
    assert at[0] == pytest.approx(0.0, abs=1e-12)
    assert at[warmup] == pytest.approx(lr, rel=1e-5)
    assert at.max() == pytest.approx(lr, rel=1e-5)
    assert np.all(np.diff(at[: warmup + 1]) > 0)  # warming up
    assert np.all(np.diff(at[warmup:]) <= 1e-12)  # then decaying
    assert at[warmup // 2] == pytest.approx(lr / 2, rel=1e-3)  # linear warm-up
    assert at[(warmup + total) // 2] == pytest.approx(lr / 2, rel=1e-2)  # cosine: half way down at the middle
    assert at[total] == pytest.approx(0.0, abs=1e-6 * lr)


def test_cosine_warmup_longer_than_the_run_is_refused_or_still_ends_at_zero():
    cfg = make_cfg(["optimizer=adamw", "trainer.max_steps=100"])  # adamw's default warm-up is 200 steps
    assert cfg.optimizer.schedule == "cosine" and cfg.optimizer.warmup_steps > cfg.trainer.max_steps
    try:
        validate(cfg)
    except UserError as err:
        assert "optimizer.warmup_steps" in str(err)
        return
    opt = instantiate(cfg.optimizer, total_steps=cfg.trainer.max_steps)
    assert float(opt.schedule(cfg.trainer.max_steps)) == pytest.approx(0.0, abs=1e-6 * cfg.optimizer.lr)
