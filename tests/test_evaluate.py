"""`cvae-eval`: the importance-sampled conditional log-likelihood of a run's best checkpoint."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import run_module

STEPS = ["trainer.max_steps=30", "trainer.eval_every=15", "checkpoint.every=15"]


def run_eval(run_dir, cli_env, cwd, *overrides: str) -> subprocess.CompletedProcess:
    return run_module("cvae_exp.evaluate", [f"run_dir={run_dir}", *overrides], env=cli_env, cwd=cwd)


@pytest.fixture(scope="module")
def quadrant_runs(tiny_mnist, session_cli, tmp_path_factory):
    """Short experiment=sohn2015 runs (shrunk networks), one CVAE and one baseline."""
    from conftest import shrunk

    root = tmp_path_factory.mktemp("quadrant_runs")
    runs = {}
    for model in ("cvae", "baseline"):
        runs[model] = root / model
        args = ["experiment=sohn2015", f"model={model}", *shrunk(tiny_mnist, runs[model], *STEPS)]
        out = session_cli(args)
        assert out.returncode == 0, out.stderr[-3000:]
    return runs


def test_cvae_eval_writes_importance_sampled_cll(quadrant_runs, cli_env, tmp_path):
    run = quadrant_runs["cvae"]
    out = run_eval(run, cli_env, tmp_path, "eval.samples=50", "eval.split=test", "eval.chunk=20")
    assert out.returncode == 0, out.stderr[-3000:]
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    written = json.loads((run / "eval.json").read_text())
    assert printed == written == json.loads((run / "eval_test.json").read_text())
    assert (written["samples"], written["split"], written["examples"]) == (50, "test", 300)
    assert written["model"] == "cvae" and written["n_given"] == 1
    assert written["checkpoint_step"] in (15, 30) and written["seconds"] > 0
    # S samples can only tighten the bound: the IS estimate lies below the negative ELBO.
    assert written["ncll_is"] <= written["neg_elbo"]
    assert written["ncll"] == written["ncll_is"]
    # One quadrant given: the other three (588 pixels) are scored, and per-pixel values divide by them.
    assert written["scored_pixels_per_example"] == 588
    for key in ("ncll", "ncll_is", "ncll_mc", "neg_elbo"):
        assert written[f"{key}_per_pixel"] == pytest.approx(written[key] / 588, rel=1e-5)


def test_baseline_eval_is_exact_and_deterministic(quadrant_runs, cli_env, tmp_path):
    run = quadrant_runs["baseline"]
    results = []
    for samples in (5, 50):  # the baseline has no latent: S does not matter
        out = run_eval(run, cli_env, tmp_path, f"eval.samples={samples}", "eval.split=val")
        assert out.returncode == 0, out.stderr[-3000:]
        results.append(json.loads((run / "eval_val.json").read_text()))
    assert "ncll_is" not in results[0] and results[0]["samples"] == 0
    assert results[0]["ncll"] == results[0]["ncll_exact"] == results[1]["ncll_exact"]
    assert results[0]["examples"] == 200


def test_eval_refuses_a_folder_that_is_not_a_run(cli_env, tmp_path):
    out = run_eval(tmp_path / "nothing", cli_env, tmp_path)
    assert out.returncode == 2 and "run_dir=" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "nothing").exists(), "a mistyped run_dir is refused, not created"
    out = run_eval(tmp_path, cli_env, tmp_path, "eval.samples=0")
    assert out.returncode == 2 and "eval.samples=0" in out.stderr


def test_eval_without_run_dir_is_one_sentence(cli_env, tmp_path):
    out = run_module("cvae_exp.evaluate", ["eval.samples=5"], env=cli_env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert (
        out.stderr.strip()
        == "error: run_dir is missing: cvae-eval run_dir=<a cvae-train run directory> names the run to use."
    )
    assert list(tmp_path.iterdir()) == []
