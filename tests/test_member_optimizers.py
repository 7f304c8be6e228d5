"""A learning rate that differs between vmap members works under every optimizer and schedule the config offers
(conf/optimizer: adam, adamw; constant or cosine, each with and without warm-up; with and without clipping): each
member's parameters equal those of its separate optimizer, and so do the learning rates it logs.

The members' optimizer is cvae_exp.training.members.member_optimizer, the one a vmap group trains with (the rate
injected into each member's optimizer state, traced); the cosine schedule failed there with a tracer error
(optax's warm-up cosine compares its peak with 0 in Python). A tiny regression stands in for the model and the
steps run op by op, so the 16 combinations take about two seconds; tests/test_vmap_launcher.py trains real
groups against their separate runs."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cvae_exp.training import members
from cvae_exp.training.optim import make_optimizer

STEPS = 12  # also trainer.max_steps: the cosine decays to 0 at the last step
RATES = (1e-2, 3e-3)
SCHEDULES = [("constant", 0), ("constant", 4), ("cosine", 0), ("cosine", 4)]  # (optimizer.schedule, warmup_steps)


def loss(params, batch):
    x, y = batch
    return jnp.mean(jnp.square(jnp.tanh(x @ params["w"] + params["b"]) - y))


def problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(STEPS, 16, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(STEPS, 16, 3)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)) * 0.5, jnp.float32), "b": jnp.zeros(3, jnp.float32)}
    return params, (x, y)


def train(tx, params, opt_state, data, lr_at):
    """STEPS updates of `params` from `opt_state`; returns the params and the rate `lr_at(state, step)` at each."""
    rates = []
    for k in range(STEPS):
        batch = jax.tree.map(lambda a, k=k: a[k], data)
        rates.append(lr_at(opt_state, k))
        updates, opt_state = tx.update(jax.grad(loss)(params, batch), opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, jnp.stack(rates)


def stacked(trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


@pytest.mark.parametrize(
    ("transform", "schedule", "clip"),
    list(itertools.product(("adam", "adamw"), SCHEDULES, (None, 0.05))),
    ids=lambda v: str(v),
)
def test_each_member_rate_equals_its_separate_optimizer(transform, schedule, clip):
    name, warmup = schedule
    optimizer = {
        "transform": {"_target_": f"optax.{transform}", "_partial_": True},
        "lr": RATES[0],
        "schedule": name,
        "warmup_steps": warmup,
        "clip_norm": clip,
    }
    params, data = problem()
    group, values = members.member_optimizer(optimizer, STEPS, ["optimizer.lr"])
    txs = [group.init(values({**optimizer, "lr": lr})) for lr in RATES]  # each member's state holds its rate
    tx = txs[0]  # the group's one transformation; the rate it applies is read from the member's state

    def member(p, state):
        return train(tx, p, state, data, lambda s, k: group.for_state(tx, s).schedule(k))

    together = jax.vmap(member)(stacked([params] * len(RATES)), stacked([t.init(params) for t in txs]))
    for i, lr in enumerate(RATES):
        alone = make_optimizer(getattr(optax, transform), lr, name, warmup, clip, STEPS)
        rate_at = lambda s, k, schedule=alone.schedule: schedule(k)  # noqa: E731
        expected, expected_rates = train(alone.tx, params, alone.tx.init(params), data, rate_at)
        got, got_rates = jax.tree.map(lambda a, i=i: a[i], together)
        np.testing.assert_allclose(got_rates, expected_rates, rtol=1e-6)
        for leaf in params:
            np.testing.assert_allclose(got[leaf], expected[leaf], rtol=1e-5, atol=1e-7)
