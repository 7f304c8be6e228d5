"""`cvae-bench`: one JSON object as the last stdout line, with the keys tools rely on, and bench.json."""

from __future__ import annotations

import json

from conftest import run_module

KEYS = {
    "examples_per_s",
    "step_ms",
    "flops_per_example",
    "peak_flops",
    "peak_source",
    "mfu",
    "device",
    "devices",
    "batch_size",
    "precision",
    "num_seeds",
    "reference_examples_per_s",
    "ratio_to_reference",
    "net",
}


def test_bench_prints_and_writes_its_measurements(small_overrides, cli_env, tmp_path):
    args = small_overrides(tmp_path / "b", "bench.steps=20", "bench.warmup=2")
    out = run_module("cvae_exp.bench", args, env=cli_env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert KEYS <= result.keys()
    assert result["batch_size"] == 32 and result["devices"] == 1 and result["precision"] == "fp32"
    assert result["examples_per_s"] > 0 and result["reference_examples_per_s"] > 0
    # XLA's count for one example: forward and backward through MLPs of this size is at least 3 x 2 x params.
    hidden, latent, pixels = 64, 4, 784
    dense_flops = 2 * (pixels * hidden + hidden * 2 * latent)  # one pass through a 1-hidden-layer MLP, roughly
    assert result["flops_per_example"] > 3 * dense_flops
    assert 0 < result["mfu"] <= 1  # the peak is an upper bound: the step's own rate at least
    assert result["peak_source"].startswith("measured")  # no known peak for a CPU
    assert json.loads((tmp_path / "b" / "bench.json").read_text()) == result


def test_bench_refuses_bad_input_before_work(small_overrides, cli_env, tmp_path):
    args = small_overrides(tmp_path / "b", "optimizer.lr=-1")
    out = run_module("cvae_exp.bench", args, env=cli_env, cwd=tmp_path)
    assert out.returncode == 2 and "optimizer.lr=-1" in out.stderr and "Traceback" not in out.stderr


def test_peak_is_never_below_the_steps_own_rate(monkeypatch):
    import jax

    from cvae_exp.bench import peak

    # The measurement itself runs in the CLI test above (mfu <= 1, peak_source "measured"); here, its result.
    monkeypatch.setattr("cvae_exp.bench.measured_peak", lambda dtype, device: 5e10)
    device = jax.devices()[0]
    value, source = peak("fp32", device, achieved=1e18)  # faster than any CPU product
    assert value == 1e18 and "raised" in source
    value, source = peak("fp32", device, achieved=1.0)
    assert value == 5e10 and source.startswith("measured") and "raised" not in source


def test_bench_times_a_vmap_group_against_the_bare_vmapped_loop(tiny_mnist, tmp_path, monkeypatch):
    import pytest
    from conftest import bench_here, compose_config, shrunk

    from cvae_exp.errors import UserError

    bench = bench_here(monkeypatch, tmp_path)
    cfg = compose_config(
        shrunk(tiny_mnist, None, "bench.members=2", "bench.steps=10", "bench.warmup=1", "logger.tensorboard=false")
    )
    result = bench(cfg)
    assert result["members"] == 2 and result["traced"] == ["optimizer.lr", "seed"]
    assert result["examples_per_s"] > 0 and result["reference_examples_per_s"] > 0
    with pytest.raises(UserError, match="bench.members=1"):
        bench(compose_config(shrunk(tiny_mnist, None, "bench.members=1")))
