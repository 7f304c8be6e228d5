"""The paper's training aid `model.baseline_run` (Sohn et al. 2015): a CVAE built on a pre-trained baseline.

One tiny baseline and one tiny aided CVAE are trained once for the module; the aided model's baseline
submodule must start from the baseline's best checkpoint, its prior and generation networks must be wider
by the output's size, cvae-eval must work on it (even with the baseline run gone), and every bad value of
the key must be refused before any work, naming it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import compose_config as compose_cfg
from conftest import in_process
from omegaconf import OmegaConf

import cvae_exp.cli  # noqa: F401  (registers the schemas in Hydra's ConfigStore)
from cvae_exp.config import ModelConfig, validate
from cvae_exp.data.geometry import MNIST
from cvae_exp.errors import UserError
from cvae_exp.models.build import build_model

QUADRANTS = ["data.condition=quadrants", "data.n_given=1", "logger.images=false"]
STEPS = ["trainer.max_steps=10", "trainer.eval_every=10", "checkpoint.every=10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, session_cli, small_overrides) -> dict[str, Path]:
    """A finished model=baseline run and a cvae run aided by it, both on the 1-quadrant task."""
    root = tmp_path_factory.mktemp("aid")
    baseline, cvae = root / "baseline", root / "cvae"
    done = session_cli(small_overrides(baseline, "model=baseline", *QUADRANTS, *STEPS))
    assert done.returncode == 0, done.stderr[-3000:]
    done = session_cli(small_overrides(cvae, "model=cvae", f"model.baseline_run={baseline}", *QUADRANTS, *STEPS))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"baseline": baseline, "cvae": cvae, "root": root}


@pytest.mark.parametrize("into", ["prior", "prior_and_generation"])
def test_aided_networks_grow_by_the_output_size(into):
    shapes = {}
    for aided in (False, True):
        cfg = OmegaConf.structured(ModelConfig(kind="hybrid", hidden=[8], latent_dim=3, baseline_into=into))
        cfg.baseline_run = "/somewhere" if aided else None
        _, params = build_model(cfg, 784, MNIST)
        shapes[aided] = jax.tree.map(lambda a: a.shape, params)
    plain, aided = shapes[False], shapes[True]
    assert "baseline" not in plain
    assert aided["baseline"]["net"]["dense0"]["kernel"] == (784, 8)  # the same network as model=baseline
    assert aided["prior_net"]["dense0"]["kernel"] == (784 + 784, 8)  # the paper's Figure 1(d): y_hat into the prior
    grown = 784 if into == "prior_and_generation" else 0
    assert aided["generation"]["dense0"]["kernel"] == (784 + grown + 3, 8)
    assert aided["recognition"] == plain["recognition"]  # q(z | x, y) already sees y


def test_a_frozen_baseline_keeps_its_parameters_and_the_rest_trains(tmp_path, small_overrides):
    """model.baseline_frozen=true: after training steps (with weight decay, which moves even parameters
    without gradient) the baseline submodule is bit for bit where it started; the other networks moved."""
    from hydra.utils import instantiate

    from cvae_exp.training import steps as trainer_steps

    cfg = compose_cfg(small_overrides(tmp_path / "unused", "model=cvae", "optimizer=adamw", *QUADRANTS))
    for frozen in (True, False):
        cfg.model.baseline_run, cfg.model.baseline_frozen = "/somewhere", frozen
        graphdef, params = build_model(cfg.model, 784, MNIST, seed=0)
        start = jax.device_get(params)  # the step donates the state's buffers
        task = trainer_steps.build_task(cfg, dynamic=False, geometry=MNIST)
        assert task.frozen_baseline is frozen
        opt = instantiate(cfg.optimizer, total_steps=10, _convert_="all")
        state = trainer_steps.init_state(params, opt.tx, 0)
        step = trainer_steps.make_train_step(graphdef, opt, task, None)
        rng = np.random.default_rng(0)
        batch = {"image": rng.integers(0, 256, (16, 784), dtype=np.uint8), "label": np.zeros(16, np.int32)}
        for _ in range(3):
            state, _ = step(state, batch)
        moved = {
            name: any(
                not np.array_equal(a, b)
                for a, b in zip(jax.tree.leaves(state["params"][name]), jax.tree.leaves(start[name]), strict=True)
            )
            for name in ("baseline", "prior_net", "generation")
        }
        assert moved["baseline"] is not frozen
        assert moved["prior_net"] and moved["generation"]


def test_baseline_submodule_starts_from_the_baseline_runs_best_params(runs):
    from cvae_exp.runs.trained_run import baseline_params, load_run, run_config
    from cvae_exp.training.experiment import build_experiment

    exp = build_experiment(run_config(runs["cvae"]))
    start = exp.init_state(0, baseline=baseline_params(exp.baseline_run))["params"]["baseline"]
    best = load_run(runs["baseline"]).params
    assert jax.tree.structure(start) == jax.tree.structure(best)
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(best), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... and is fine-tuned: after training it has moved away from there.
    trained = load_run(runs["cvae"]).params["baseline"]
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(best), strict=True))


def test_eval_of_an_aided_run_needs_no_baseline_run(runs, cli_env, tmp_path):
    moved = runs["root"] / "baseline_moved"
    runs["baseline"].rename(moved)  # the architecture comes from the aided run's own config
    try:
        done = in_process(
            "cvae_exp.evaluate", [f"run_dir={runs['cvae']}", "eval.samples=20"], env=cli_env, cwd=tmp_path
        )
    finally:
        moved.rename(runs["baseline"])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert np.isfinite(result["ncll_is"])
    assert result["ncll_is"] <= result["neg_elbo"] + 1e-3


def _not_a_baseline(runs, tmp_path):
    return runs["cvae"]


def _no_checkpoint(runs, tmp_path):
    copy = tmp_path / "no_checkpoint"
    shutil.copytree(runs["baseline"] / ".hydra", copy / ".hydra")
    return copy


@pytest.mark.parametrize(
    ("where", "extra", "says"),
    [
        (lambda runs, tmp: tmp / "missing", [], "does not exist"),
        (lambda runs, tmp: tmp, [], "not a cvae-train run directory"),
        (_not_a_baseline, [], "model.kind=cvae run"),
        (_no_checkpoint, [], "holds no checkpoint"),
        (lambda runs, tmp: runs["baseline"], ["data.n_given=2"], "data.n_given=1"),
        (lambda runs, tmp: runs["baseline"], ["data.quadrant_layout=top_first"], "data.quadrant_layout"),
        (lambda runs, tmp: runs["baseline"], ["model.hidden=[32]"], "model.baseline_hidden=[64]"),
        (lambda runs, tmp: runs["baseline"], ["model=baseline"], "model.kind=baseline"),
        (lambda runs, tmp: runs["baseline"], ["model=vae"], "model.kind=vae"),
        (lambda runs, tmp: runs["baseline"], ["data.condition=label"], "data.condition=quadrants"),
    ],
)
def test_bad_baseline_run_is_refused_naming_the_key(runs, tmp_path, small_overrides, where, extra, says):
    path = where(runs, tmp_path)
    model = [] if any(e.startswith("model=") for e in extra) else ["model=cvae"]
    overrides = small_overrides(None, *model, *QUADRANTS, f"model.baseline_run={path}", *extra)
    with pytest.raises(UserError, match="model.baseline_run") as err:
        validate(compose_cfg(overrides))
    assert says in str(err.value)


def test_cli_exits_2_on_a_bad_baseline_run(run_cli, small_overrides, tmp_path):
    done = run_cli(small_overrides(tmp_path / "run", "model=cvae", *QUADRANTS, f"model.baseline_run={tmp_path}/nope"))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "model.baseline_run=" in done.stderr and "Traceback" not in done.stderr
