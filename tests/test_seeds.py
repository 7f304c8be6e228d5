"""`trainer.num_seeds=K`: K models trained together by jax.vmap equal K separate runs, seed by seed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tbevents
from cli_runs import metrics
from conftest import in_process, run_module

SEED, K, STEPS = 3, 2, 30
COMPARED = ("val/elbo", "val/kl", "val/recon", "test/elbo", "test/kl", "test/recon")


@pytest.fixture(scope="module")
def runs(session_cli, small_overrides, tmp_path_factory):
    """One 2-seed run (seeds 3, 4) and the two single runs it must reproduce."""
    root = tmp_path_factory.mktemp("seeds")
    common = (f"trainer.max_steps={STEPS}", "trainer.eval_every=15", "checkpoint.every=15")
    out = {}
    for name, extra in {
        "vmapped": (f"seed={SEED}", f"trainer.num_seeds={K}"),
        SEED: (f"seed={SEED}",),
        SEED + 1: (f"seed={SEED + 1}",),
    }.items():
        result = session_cli(small_overrides(root / str(name), *common, *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = root / str(name)
    return out


def test_each_seed_equals_its_separate_run(runs):
    together = metrics(runs["vmapped"])
    assert together["num_seeds"] == K
    assert [s["seed"] for s in together["seeds"]] == [SEED, SEED + 1]
    for seed_result in together["seeds"]:
        alone = metrics(runs[seed_result["seed"]])
        for key in COMPARED:
            assert seed_result[key] == pytest.approx(alone[key], rel=1e-5), (seed_result["seed"], key)
    # the seeds really are different models
    assert together["seeds"][0]["params_sha256"] != together["seeds"][1]["params_sha256"]
    assert together["seeds"][0]["val/elbo"] != together["seeds"][1]["val/elbo"]


def test_top_level_metrics_are_the_means_over_the_seeds(runs):
    together = metrics(runs["vmapped"])
    for key in COMPARED:
        assert together[key] == pytest.approx(np.mean([s[key] for s in together["seeds"]]), rel=1e-9)
    assert together["step"] == STEPS and together["skipped_steps"] == 0


def test_each_seed_has_its_own_tensorboard_run_with_its_own_curve(runs):
    tb = runs["vmapped"] / "tb"
    curves = {}
    for seed in (SEED, SEED + 1):
        s = tbevents.load(tb / f"seed_{seed}")
        assert s.steps("val/elbo") == [15, 30]
        assert "train/loss" in s.scalars and "val/samples" in s.image_tags
        curves[seed] = s.values("val/elbo")
        alone = tbevents.load(runs[seed] / "tb").values("val/elbo")
        assert curves[seed] == pytest.approx(alone, rel=1e-5)
    assert curves[SEED] != curves[SEED + 1]
    assert not tbevents.event_files(tb), "a K-seed run writes no events outside its per-seed runs"


def test_eval_picks_one_seed_and_refuses_one_out_of_range(runs, cli_env, tmp_path):
    args = [f"run_dir={runs['vmapped']}", "eval.samples=4", "eval.seed_index=1", "eval.split=val"]
    out = in_process("cvae_exp.evaluate", args, env=cli_env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    picked = json.loads(out.stdout.strip().splitlines()[-1])
    alone = in_process(
        "cvae_exp.evaluate",
        [f"run_dir={runs[SEED + 1]}", "eval.samples=4", "eval.split=val"],
        env=cli_env,
        cwd=tmp_path,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    expected = json.loads(alone.stdout.strip().splitlines()[-1])
    assert picked["seed"] == expected["seed"] == SEED + 1
    assert picked["ncll_is"] == pytest.approx(expected["ncll_is"], rel=1e-5)
    assert math.isfinite(picked["ncll_is"]) and picked["ncll_is"] <= picked["neg_elbo"] + 1e-3

    out = run_module("cvae_exp.evaluate", [args[0], "eval.seed_index=2"], env=cli_env, cwd=tmp_path)
    assert out.returncode == 2 and "eval.seed_index=2" in out.stderr and "Traceback" not in out.stderr


def test_resuming_with_another_number_of_seeds_is_refused(runs, session_cli, small_overrides):
    run_dir = runs["vmapped"]
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    out = session_cli(small_overrides(run_dir, f"trainer.max_steps={STEPS + 15}", "trainer.num_seeds=3", "resume=true"))
    assert out.returncode == 2 and "trainer.num_seeds" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_bench_counts_every_seed(small_overrides, tmp_path, monkeypatch):
    from conftest import bench_here, compose_config

    bench = bench_here(monkeypatch, tmp_path)
    args = small_overrides(
        None, "bench.steps=10", "bench.warmup=2", f"trainer.num_seeds={K}", "logger.tensorboard=false"
    )
    result = bench(compose_config(args))
    assert result["num_seeds"] == K
    # examples/s counts all seeds: K x batch per median step
    assert result["examples_per_s"] == pytest.approx(K * 32 / (result["step_ms"] / 1e3), rel=1e-6)
    assert result["reference_examples_per_s"] > 0
