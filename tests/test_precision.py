"""trainer.precision=bf16: the same parameters (fp32) give the same losses and gradients to bf16 tolerance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf

from cvae_exp.config import ModelConfig
from cvae_exp.data.geometry import MNIST
from cvae_exp.models.build import build_model
from cvae_exp.training.steps import Task, loss_fn


def test_bf16_step_agrees_with_fp32():
    cfg = OmegaConf.structured(ModelConfig(hidden=[256, 256], latent_dim=16))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (64, 784)).astype(np.uint8), "label": rng.integers(0, 10, 64)}
    task = Task(kind="cvae", condition="label", geometry=MNIST, dynamic=True)
    key = jax.random.key(3)
    results = {}
    for precision in ("fp32", "bf16"):
        graphdef, params = build_model(cfg, 10, MNIST, precision=precision, seed=0)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # parameters stay fp32

        def mean_loss(p, graphdef=graphdef):
            return loss_fn(p, graphdef, batch, key, jnp.int32(0), task, train=True)[0].mean()

        results[precision] = jax.jit(jax.value_and_grad(mean_loss))(params)  # one program, as training runs it
    (loss32, grads32), (loss16, grads16) = results["fp32"], results["bf16"]
    assert float(loss16) == float(loss16) and abs(float(loss16) - float(loss32)) < 1e-2 * abs(float(loss32))
    assert float(loss16) != float(loss32)  # the matmuls really ran in bf16
    g32 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads32)])
    g16 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads16)])
    cosine = g32 @ g16 / (np.linalg.norm(g32) * np.linalg.norm(g16))
    assert cosine > 0.99
