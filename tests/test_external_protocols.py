"""What the external checks' protocols need (conf/experiment/burda2016_*.yaml, docs/external_checks.md), each
against an independent transcription of the reference code: Burda et al.'s stepwise learning rate as
yburda/iwae and nbip/IWAE compute it, Adam in the epsilon-hat form of yburda/iwae's optimizers.py and of
Keras, tanh networks with Glorot's initialisation and the data-mean output bias, the 59,600 / 400 split in
file order, and the importance-weighted bound as a training objective."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from conftest import REPO, compose_config
from flax import nnx
from hydra.utils import instantiate

import cvae_exp.cli  # noqa: F401  (registers the config schemas)
from cvae_exp.config import validate
from cvae_exp.data.geometry import MNIST, Geometry
from cvae_exp.data.pipeline import BatchSampler, make_splits
from cvae_exp.errors import UserError
from cvae_exp.models.build import build_model, data_logit
from cvae_exp.models.cvae import CVAE
from cvae_exp.models.distributions import gaussian_log_prob, kl_diag_gaussians, log_likelihood
from cvae_exp.models.mlp import MLP
from cvae_exp.models.nets import mlp_nets
from cvae_exp.models.objectives import conditional_nll, iw_bound, per_example_loss
from cvae_exp.training.optim import adam_epsilon_hat, make_optimizer

# ----------------------------------------------------------------------------- the learning-rate schedules


def yburda_lr_at_epoch(epoch: int) -> float:
    """yburda/iwae experiments.py, checkpoint1to8: stage i = 1..8 trains 3^(i-1) epochs at this rate."""
    start = 0
    for i in range(1, 9):
        if epoch < start + 3 ** (i - 1) or i == 8:
            return 1e-4 * round(10.0 ** (1 - (i - 1) / 7.0), 1)
        start += 3 ** (i - 1)


def nbip_lr_at_epoch(epoch: int) -> float:
    """nbip/IWAE tasks/task04.py: learning_rate_dict[first epoch of stage i] = 0.001 * 10 ** (-i / 7)."""
    changes, epochs = {}, 0
    for i in range(8):
        changes[epochs] = 0.001 * 10 ** (-i / 7)
        epochs += 3**i
    return changes[max(e for e in changes if e <= epoch)]


@pytest.mark.parametrize(
    ("schedule", "reference"), [("burda", yburda_lr_at_epoch), ("burda_unrounded", nbip_lr_at_epoch)]
)
def test_burda_schedules_match_the_reference_code_at_every_boundary(schedule, reference):
    per_epoch = 7  # any epoch length: boundaries are counted in steps
    opt = make_optimizer(optax.adam, 1e-3, schedule, steps_per_epoch=per_epoch)
    starts = [(3**i - 1) // 2 for i in range(8)]  # 0, 1, 4, 13, 40, 121, 364, 1093
    assert starts[-1] + 3**7 == 3280
    for epoch in sorted({e + d for e in starts for d in (-1, 0, 1) if e + d >= 0} | {3279, 3280, 5000}):
        for step in (epoch * per_epoch, epoch * per_epoch + per_epoch - 1):
            assert float(opt.schedule(step)) == np.float32(reference(epoch)), (schedule, epoch, step)
    if schedule == "burda":  # the code's rounding: 7.2e-4, not 7.197e-4
        assert float(opt.schedule(per_epoch)) == np.float32(7.2e-4)


def test_a_burda_schedule_needs_the_epoch_length():
    with pytest.raises(UserError, match="optimizer.steps_per_epoch"):
        make_optimizer(optax.adam, 1e-3, "burda")


def test_the_experiment_passes_the_training_split_epoch(tiny_mnist):
    from cvae_exp.training.experiment import build_experiment

    cfg = compose_config(
        [f"data.path={tiny_mnist}", "data.val_size=200", "trainer.batch_size=100", "optimizer.schedule=burda"]
    )
    opt = build_experiment(cfg).opt  # 1,000 training digits: 10 steps an epoch
    assert float(opt.schedule(9)) == np.float32(1e-3) and float(opt.schedule(10)) == np.float32(7.2e-4)


# ----------------------------------------------------------------------------- Adam


def yburda_adam(grads: list[np.ndarray], lrs: list[float], batch: int) -> list[np.ndarray]:
    """yburda/iwae optimizers.py Adam, transcribed (float64): beta_1 0.99, second moments start at ones, the
    timestep at 1, every update computed from the values before the step (Theano's updates), and the gradient
    that of the SUM over a batch (`batch` times our mean's). Returns the parameter change of every step."""
    m, v, t, out = np.zeros_like(grads[0]), np.ones_like(grads[0]), 1.0, []
    for g, lr in zip(grads, lrs, strict=True):
        g = batch * g
        alpha = lr * math.sqrt(1 - 0.999**t) / (1 - 0.99**t)
        out.append(-alpha * m / (np.sqrt(v) + 1e-4))  # descent on our loss = ascent on their log-likelihood
        m, v, t = 0.99 * m + 0.01 * g, 0.999 * v + 0.001 * g**2, t + 1
    return out


def keras_adam(grads: list[np.ndarray], lr: float) -> list[np.ndarray]:
    """tf.keras Adam (epsilon is "epsilon hat"): lr_t = lr sqrt(1 - b2^t) / (1 - b1^t), x -= lr_t m / (sqrt(v) + eps)."""
    m, v, out = 0.0, 0.0, []
    for t, g in enumerate(grads, start=1):
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
        out.append(-lr * math.sqrt(1 - 0.999**t) / (1 - 0.9**t) * m / (np.sqrt(v) + 1e-4))
    return out


def run_transform(tx, grads):
    state, out = tx.init(jnp.zeros(3)), []
    for g in grads:
        update, state = tx.update(jnp.asarray(g, jnp.float32), state)
        out.append(np.asarray(update))
    return out


def test_adam_epsilon_hat_is_yburda_adam_with_its_lag_and_its_ones():
    rng = np.random.default_rng(0)
    grads = [rng.normal(0, s, 3) for s in np.geomspace(1e-3, 1.0, 40)]  # small gradients: eps and nu_init matter
    sched = make_optimizer(optax.adam, 1e-3, "burda", steps_per_epoch=5).schedule  # crosses 3 boundaries
    tx = adam_epsilon_hat(sched, b1=0.99, b2=0.999, eps=1e-4, nu_init=1.0, grad_scale=20, lagged=True)
    got = run_transform(tx, grads)
    want = yburda_adam(grads, [float(sched(s)) for s in range(40)], batch=20)
    assert np.all(got[0] == 0)  # their first step moves nothing: the moments it applies are still zero
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(want), rtol=2e-5, atol=1e-12)


def test_adam_epsilon_hat_is_keras_adam_and_differs_from_optax_adam_early():
    rng = np.random.default_rng(1)
    grads = [rng.normal(0, 1e-3, 3) for _ in range(30)]
    got = run_transform(adam_epsilon_hat(1e-3, eps=1e-4), grads)
    np.testing.assert_allclose(np.concatenate(got), np.concatenate(keras_adam(grads, 1e-3)), rtol=2e-5)
    optax_first = run_transform(optax.adam(1e-3, eps=1e-4), grads[:1])[0]
    assert not np.allclose(optax_first, got[0], rtol=1e-2)  # optax adds eps to the corrected sqrt(v_hat)


def test_optax_adam_eps_reaches_the_transform_from_the_config():
    grads = [np.full(3, 1e-4)]
    tuned = instantiate(compose_config(["optimizer.transform.eps=1e-4"]).optimizer, total_steps=10)
    plain = instantiate(compose_config([]).optimizer, total_steps=10)
    np.testing.assert_allclose(run_transform(tuned.tx, grads)[0], run_transform(optax.adam(1e-3, eps=1e-4), grads)[0])
    assert not np.allclose(run_transform(plain.tx, grads)[0], run_transform(tuned.tx, grads)[0])


# ----------------------------------------------------------------------------- networks


def test_tanh_mlp_is_tanh_between_layers_and_glorot_uniform_is_bounded():
    mlp = MLP([30, 40, 5], activation="tanh", kernel_init="glorot_uniform", rngs=nnx.Rngs(0))
    x = np.random.default_rng(2).normal(size=(4, 30)).astype(np.float32)
    w0, b0 = np.asarray(mlp.dense0.kernel[...]), np.asarray(mlp.dense0.bias[...])
    w1, b1 = np.asarray(mlp.dense1.kernel[...]), np.asarray(mlp.dense1.bias[...])
    np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), np.tanh(x @ w0 + b0) @ w1 + b1, rtol=1e-5, atol=1e-5)
    bound = math.sqrt(6 / (30 + 40))
    assert np.abs(w0).max() <= bound and np.abs(w0).max() > 0.9 * bound  # uniform on [-s, s]
    assert np.std(w0) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    relu = MLP([30, 40, 5], rngs=nnx.Rngs(0))  # the default: ReLU and Flax's LeCun normal, as before
    assert np.abs(np.asarray(relu.dense0.kernel[...])).max() > bound


def test_data_logit_output_bias_starts_at_the_mean_training_pixel():
    images = np.random.default_rng(3).integers(0, 256, (50, 12), dtype=np.uint8)
    images[:, 0] = 0  # a pixel always black: clipped to 0.001
    cfg = compose_config(["model=vae", "model.hidden=[8]", "model.latent_dim=2", "model.output_bias=data_logit"])
    _, params = build_model(cfg.model, 0, Geometry(1, 12, 1, 0, ()), output_bias=data_logit(images))
    bias = np.asarray(params["generation"]["dense1"]["bias"])
    mean = np.clip(images.mean(0) / 255, 0.001, 0.999)
    np.testing.assert_allclose(bias, np.log(mean / (1 - mean)), rtol=1e-5)
    assert bias[0] == pytest.approx(math.log(0.001 / 0.999), rel=1e-5)


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def raw():
    rng = np.random.default_rng(4)
    return SimpleNamespace(
        train_images=rng.integers(0, 256, (500, 28, 28), dtype=np.uint8),
        train_labels=np.arange(500) % 10,
        test_images=rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
        test_labels=np.arange(50) % 10,
        geometry=MNIST,
    )


def test_last_split_is_the_file_order_and_val_can_stay_in_training(raw):
    flat = raw.train_images.reshape(500, -1)
    s = make_splits(raw, val_size=40, split_seed=0, binarize="none", val_from="last", shuffle=False)
    np.testing.assert_array_equal(s.train.images, flat[:460])  # yburda/iwae: train_data[:-n], in file order
    np.testing.assert_array_equal(s.val.images, flat[460:])  # and train_data[-n:]
    sampler = BatchSampler(s.train, 20, seed=5)
    np.testing.assert_array_equal(sampler.order(0), np.arange(460))
    np.testing.assert_array_equal(sampler.batch(24)["image"], flat[20:40])  # epoch 1 (23 steps), batch 1: as epoch 0
    kept = make_splits(raw, val_size=40, split_seed=0, binarize="none", val_from="last", val_holdout=False)
    assert len(kept.train.images) == 500 and len(kept.val.images) == 40  # nbip/IWAE trains on everything
    np.testing.assert_array_equal(np.sort(kept.train.labels), np.sort(raw.train_labels))
    assert not np.array_equal(BatchSampler(kept.train, 20, 5).order(0), np.arange(500))  # shuffled by default


# ----------------------------------------------------------------------------- the importance-weighted bound


@pytest.fixture(scope="module")
def cvae_batch():
    model = CVAE(10, 20, nets=mlp_nets([16], 20, seed=5, activation="tanh"), latent_dim=3)
    rng = np.random.default_rng(6)
    x = jax.nn.one_hot(rng.integers(0, 10, 8), 10)
    y = jnp.asarray(rng.integers(0, 2, (8, 20)), jnp.float32)
    return model, x, y, jnp.ones_like(y)


def test_iw_bound_with_one_sample_is_the_elbo_with_the_kl_at_the_sample(cvae_batch):
    model, x, y, mask = cvae_batch
    key = jax.random.key(7)
    loss, metrics = iw_bound(model, x, y, mask, key, samples=1, beta=1.0)
    q, p = model.encode(x, y), model.prior(x)
    z = q[0] + jnp.exp(0.5 * q[1]) * jax.random.normal(key, (1, *q[0].shape))
    ll = log_likelihood(y, model.generate(z, x), mask)[0]
    want = -(ll + gaussian_log_prob(z[0], p) - gaussian_log_prob(z[0], q))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["elbo"], -ll + kl_diag_gaussians(q, p), rtol=1e-5)


def test_iw_bound_tightens_with_k_towards_the_importance_sampled_likelihood(cvae_batch):
    model, x, y, mask = cvae_batch
    keys = jax.random.split(jax.random.key(8), 200)
    mean_bound = {
        k: float(jnp.mean(jax.vmap(lambda kk, k=k: iw_bound(model, x, y, mask, kk, samples=k, beta=1.0)[0])(keys)))
        for k in (1, 5, 50)
    }
    exact = float(
        jnp.mean(conditional_nll(model, x, y, mask, jax.random.key(9), samples=5000, chunk=1000, has_q=True)["ncll_is"])
    )
    assert mean_bound[1] > mean_bound[5] > mean_bound[50] > exact - 0.05  # -L_k falls with k, to -log p(y | x)
    assert mean_bound[50] - exact < 0.5 * (mean_bound[1] - exact)


def test_iw_samples_one_keeps_the_closed_form_elbo_and_k_samples_train_the_bound(cvae_batch):
    model, x, y, mask = cvae_batch
    key = jax.random.key(10)
    default, _ = per_example_loss(model, x, y, mask, key, kind="cvae", beta=1.0, alpha=0.5)
    one, m = per_example_loss(model, x, y, mask, key, kind="cvae", beta=1.0, alpha=0.5, iw_samples=1)
    np.testing.assert_array_equal(default, one)  # k = 1: the same computation, bit for bit
    assert "iw_bound" not in m
    five, m5 = per_example_loss(model, x, y, mask, key, kind="cvae", beta=1.0, alpha=0.5, iw_samples=5)
    np.testing.assert_array_equal(five, m5["iw_bound"])
    assert np.all(np.isfinite(five)) and not np.allclose(five, one)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["model=gsnn", "data.condition=label", "model.iw_samples=5"], "model.iw_samples=5"),
        (["model=baseline", "data.condition=label", "model.kl=sampled"], "model.kl=sampled"),
        (["model.activation=sigmoid"], "model.activation=sigmoid"),
        (
            ["model.likelihood=gaussian", "data.binarize=none", "model.output_bias=data_logit"],
            "model.output_bias=data_logit",
        ),
        (["model.iw_samples=0"], "model.iw_samples=0"),
        (["data.val_from=first"], "data.val_from=first"),
        (["optimizer.schedule=stairs"], "optimizer.schedule=stairs"),
        (["optimizer.steps_per_epoch=0"], "optimizer.steps_per_epoch=0"),
    ],
)
def test_impossible_protocol_values_are_refused_naming_the_key(overrides, named):
    with pytest.raises(UserError, match=named):
        validate(compose_config(overrides))


def test_the_protocols_train_count_and_schedule_3280_epochs():
    mnist_sized = SimpleNamespace(
        train_images=np.zeros((60_000, 28, 28), np.uint8),
        train_labels=np.zeros(60_000, np.int32),
        test_images=np.zeros((10, 28, 28), np.uint8),
        test_labels=np.zeros(10, np.int32),
        geometry=MNIST,
    )
    for name, train_digits in (("burda2016_vae", 59_600), ("burda2016_cvae_label", 60_000)):
        d = compose_config([f"experiment={name}"]).data
        splits = make_splits(
            mnist_sized,
            val_size=d.val_size,
            split_seed=0,
            binarize="none",
            val_from=d.val_from,
            val_holdout=d.val_holdout,
        )
        cfg = compose_config([f"experiment={name}"])
        assert len(splits.train.images) == train_digits
        assert cfg.optimizer.steps_per_epoch == train_digits // cfg.trainer.batch_size
        assert cfg.trainer.max_steps == 3280 * cfg.optimizer.steps_per_epoch


def test_an_iw_run_trains_and_cvae_eval_scores_its_last_checkpoint(session_cli, small_overrides, tmp_path, cli_env):
    from conftest import in_process

    run = tmp_path / "iw"
    args = ["model=vae", "model.iw_samples=5", "model.activation=tanh", "optimizer.schedule=burda"]
    out = session_cli(
        [*args, *small_overrides(run, "trainer.max_steps=40", "trainer.eval_every=20", "checkpoint.every=20")]
    )
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 40 and math.isfinite(metrics["val/elbo"])
    out = in_process(
        "cvae_exp.evaluate", [f"run_dir={run}", "eval.samples=20", "eval.checkpoint=last"], env=cli_env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((run / "eval_test.json").read_text())
    assert result["checkpoint_step"] == 40 and result["checkpoint"] == "last"
    assert result["ncll_is"] <= result["neg_elbo"]


# ----------------------------------------------------------------------------- the results table


def fake_run(folder, seed: int, step: int, ncll: float) -> None:
    (folder / ".hydra").mkdir(parents=True)
    data = f"parquet:{folder.parent / 'mnist'}"  # resolved by the run, as a relative data.path is
    metrics = {"step": step, "wall_s": 9.0, "hardware": "test host", "data_source": data}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    test = {"samples": 5000, "examples": 10000, "checkpoint": "last", "ncll": ncll, "ncll_sem": 0.3, "seconds": 1.0}
    (folder / "eval_test.json").write_text(json.dumps(test))
    (folder / "eval_val.json").write_text(json.dumps({**test, "examples": 400, "ncll": ncll + 0.5}))
    holdout = "false" if seed == 1 else "true"  # seed 1 as the label protocol: its val digits are trained on
    (folder / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\ntrainer:\n  max_steps: 100\ndata:\n  val_holdout: {holdout}\n"
    )
    overrides = ["experiment=burda2016_vae", "data.path=../mnist", f"seed={seed}", "resume=auto"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if seed == 1:  # a run that went on from its checkpoint twice; the others were recorded without a log
        launch = f"Devices: 1; run dir: {folder}\nData: {data}; train 59600\n"
        (folder / "train.log").write_text(f"{launch}Resumed from step 40\n{launch}Resumed from step 80\n")


def test_external_checks_table_counts_finished_runs_only_and_leaves_the_rest_pending(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("external_checks", REPO / "scripts" / "external_checks.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    monkeypatch.chdir(tmp_path)
    for seed, step, ncll in ((0, 100, 87.0), (1, 100, 88.0), (2, 60, 80.0)):  # seed 2 has not finished
        fake_run(tmp_path / f"run{seed}", seed, step, ncll)
        ext.record(tmp_path / f"run{seed}", f"burda2016_vae_s{seed}")
    rows = {r["protocol"].split(",")[0]: r for r in ext.rows()}
    vae = rows["VAE"]
    assert (vae["status"], vae["seeds"], vae["ours_nll"]) == ("finished", 2, 87.5)
    assert vae["ours_spread"] == round(math.sqrt(0.5), 2) and vae["gap"] == "+0.74"
    command = "cvae-train experiment=burda2016_vae data.path=../mnist seed=<seed> hydra.run.dir=<run dir>"
    assert vae["train_command"] == command
    assert all(r["status"] == "pending" and r["ours_nll"] == "" for k, r in rows.items() if k != "VAE")
    page = ext.markdown(ext.rows())  # the runs' table: each finished seed with its test and val figures
    assert "| 0 | 100 | 87.00 ± 0.30 | 87.50 | not recorded | 9 | 1 | test host |" in page
    assert "| 1 | 100 | 88.00 ± 0.30 | 88.50 (trained on) | 2 | 9 | 1 | test host |" in page
    assert "| 2 | 60 |" not in page
    kept = tmp_path / "results/external_checks_cells/burda2016_vae_s1"
    assert (kept / "train.log").read_text().count("Resumed") == 2
    # the committed record names no path of the machine: the run dir and the data as the command gave them
    assert "run dir: <run dir>\nData: parquet:../mnist;" in (kept / "train.log").read_text()
    assert json.loads((kept / "metrics.json").read_text())["data_source"] == "parquet:../mnist"
    assert not [f for f in kept.rglob("*") if f.is_file() and str(tmp_path) in f.read_text()]


def test_committed_external_checks_are_rebuilt_from_the_committed_records(tmp_path):
    import shutil
    import subprocess
    import sys

    for folder in ("results", "scripts"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    out = subprocess.run(
        [sys.executable, "scripts/external_checks.py", "table"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    for name in ("external_checks.csv", "external_checks.md"):
        assert (tmp_path / "results" / name).read_text() == (REPO / "results" / name).read_text(), name
