"""The training split held on the device (the default) feeds exactly the batches the host sampler cuts."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import shrunk

from cvae_exp.data.pipeline import BatchSampler, Split, make_sampler
from cvae_exp.training import devices
from cvae_exp.training.feed import DeviceFeed, HostFeed, make_feed


def toy_split(n: int = 50) -> Split:
    rng = np.random.default_rng(0)
    return Split(rng.integers(0, 256, (n, 784), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32))


@pytest.mark.parametrize("seeds", [[3], [3, 4]])
def test_device_batches_equal_host_batches_across_epochs(seeds):
    split, batch = toy_split(), 8  # 6 steps per epoch: steps 0..13 cross two epoch boundaries
    mesh = devices.make_mesh("all")
    sharding = devices.data_sharded(mesh, len(seeds))
    feed = DeviceFeed(split, batch, seeds, devices.replicated(mesh), sharding)
    cut = jax.jit(feed.cut)
    host = make_sampler(split, batch, seeds)
    for step in range(14):
        step_array = np.full((len(seeds),) if len(seeds) > 1 else (), step, np.int32)
        got = jax.device_get(cut(feed(step), step_array))
        want = host.batch(step)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    # each epoch's order goes to the device once, not every step
    assert feed(12) is feed(13) and feed(11) is not feed(12)


def test_host_feed_is_the_choice_when_asked():
    split, mesh = toy_split(), devices.make_mesh("all")
    args = (split, 8, [0], devices.replicated(mesh), devices.data_sharded(mesh))
    assert isinstance(make_feed(*args, on_device=True), DeviceFeed)
    host = make_feed(*args, on_device=False)
    assert isinstance(host, HostFeed)
    np.testing.assert_array_equal(jax.device_get(host(7))["image"], BatchSampler(split, 8, 0).batch(7)["image"])


def test_a_run_is_the_same_with_either_feed(session_cli, small_overrides, tmp_path):
    results = {}
    for on_device in ("true", "false"):
        run_dir = tmp_path / on_device
        out = session_cli(small_overrides(run_dir, "trainer.max_steps=30", f"trainer.data_on_device={on_device}"))
        assert out.returncode == 0, out.stderr[-3000:]
        results[on_device] = json.loads((run_dir / "metrics.json").read_text())
    assert results["true"]["params_sha256"] == results["false"]["params_sha256"]
    assert results["true"]["val/elbo"] == results["false"]["val/elbo"]


def test_several_steps_per_dispatch_reach_the_same_parameters_and_log_the_same_steps(tiny_mnist, tmp_path):
    """trainer.steps_per_dispatch=N runs the steps between two log/eval/checkpoint steps N at a time in one
    dispatch (a lax.scan over batches gathered at once); the parameters, the checkpoints and the logged steps
    are those of one step per dispatch, bit for bit, also across an epoch's end (1,000 digits, batch 32)."""
    import tbevents

    from cvae_exp import api

    runs = {}
    for n in (1, 7):
        args = (
            "trainer.max_steps=75",
            "trainer.log_every=25",
            f"trainer.steps_per_dispatch={n}",
            "logger.images=false",
        )
        runs[n] = (api.train(shrunk(tiny_mnist, None, *args), run_dir=tmp_path / str(n)), tmp_path / str(n))
    (one, one_dir), (seven, seven_dir) = runs[1], runs[7]
    assert seven["params_sha256"] == one["params_sha256"] and seven["val/elbo"] == one["val/elbo"]
    assert tbevents.load(seven_dir / "tb").steps("train/loss") == tbevents.load(one_dir / "tb").steps("train/loss")
    assert sorted(p.name for p in (seven_dir / "checkpoints").iterdir()) == ["30", "60", "75"]
