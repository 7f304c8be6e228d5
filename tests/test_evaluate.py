"""`cvae-eval`: the importance-sampled conditional log-likelihood of a run's best checkpoint."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from conftest import in_process, run_module

STEPS = ["trainer.max_steps=30", "trainer.eval_every=15", "checkpoint.every=15"]


def run_eval(run_dir, cli_env, cwd, *overrides: str) -> subprocess.CompletedProcess:
    """`cvae-eval run_dir=<run_dir> *overrides`, in this process (the refusals below run it as a new one)."""
    return in_process("cvae_exp.evaluate", [f"run_dir={run_dir}", *overrides], env=cli_env, cwd=cwd)


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


def test_standard_error_and_subset_match_the_per_digit_values(quadrant_runs):
    """eval.examples=N scores the first N digits; `*_sem` is their sample standard deviation over sqrt(N)."""
    import jax
    import numpy as np
    from flax import nnx

    from cvae_exp.data.geometry import MNIST
    from cvae_exp.data.pipeline import prepare_arrays
    from cvae_exp.evaluate import evaluate_run
    from cvae_exp.models.distributions import log_likelihood
    from cvae_exp.runs.trained_run import load_run

    result = evaluate_run(str(quadrant_runs["baseline"]), 1, "test", 1, 16, examples=40)
    assert result["examples"] == 40
    run = load_run(quadrant_runs["baseline"])
    batch = {"image": run.splits.test.images[:40], "label": run.splits.test.labels[:40]}
    x, y, mask = prepare_arrays(
        batch, jax.random.key(0), geometry=MNIST, dynamic=False, condition="quadrants", n_given=1
    )
    values = -np.asarray(log_likelihood(y, nnx.merge(run.graphdef, run.params)(x), mask), np.float64)
    assert result["ncll_exact"] == pytest.approx(values.mean(), rel=1e-5)
    assert result["ncll_sem"] == result["ncll_exact_sem"] == pytest.approx(values.std(ddof=1) / np.sqrt(40), rel=1e-3)


def test_a_tagged_eval_leaves_the_tables_file_alone(quadrant_runs, cli_env, tmp_path):
    run = quadrant_runs["cvae"]
    before = (run / "eval_test.json").read_text() if (run / "eval_test.json").exists() else None
    out = run_eval(run, cli_env, tmp_path, "eval.samples=7", "eval.examples=20", "eval.tag=S7")
    assert out.returncode == 0, out.stderr[-3000:]
    tagged = json.loads((run / "eval_test_S7.json").read_text())
    assert (tagged["samples"], tagged["examples"]) == (7, 20)
    after = (run / "eval_test.json").read_text() if (run / "eval_test.json").exists() else None
    assert after == before


def test_mc_gap_script_writes_nested_estimates_per_sample_count(quadrant_runs, cli_env, tmp_path):
    """scripts/sohn2015_mc_gap.sh: one row per (S, subset), each from a tagged cvae-eval of the run."""
    import csv
    import sys
    from pathlib import Path

    from conftest import REPO

    out = tmp_path / "gap.csv"
    env = cli_env | {"BIN": str(Path(sys.executable).parent), "EXAMPLES": "30", "SAMPLES": "2 20", "FULL": "2"}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "sohn2015_mc_gap.sh"), str(quadrant_runs["cvae"]), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [(r["samples"], r["examples"]) for r in rows] == [("2", "30"), ("20", "30"), ("2", "300")]
    for row in rows:
        assert float(row["ncll_is"]) <= float(row["neg_elbo"]) + 1e-3
        saved = json.loads(
            (
                quadrant_runs["cvae"]
                / f"eval_test_S{row['samples']}_{'all' if row['examples'] == '300' else 'first30'}.json"
            ).read_text()
        )
        assert float(row["ncll_mc"]) == pytest.approx(saved["ncll_mc"], abs=1e-3)


def test_eval_without_run_dir_is_one_sentence(cli_env, tmp_path):
    out = run_module("cvae_exp.evaluate", ["eval.samples=5"], env=cli_env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert (
        out.stderr.strip()
        == "error: run_dir is missing: cvae-eval run_dir=<a cvae-train run directory> names the run to use."
    )
    assert list(tmp_path.iterdir()) == []


def test_a_long_evaluation_shows_a_bar_with_the_time_left_unless_switched_off(quadrant_runs, cli_env, tmp_path):
    """cvae-eval ran 38 minutes with no output (eval.samples=1000 over the test split): now one bar, batch by batch,
    with the time left; eval.progress=false (or TQDM_DISABLE=1) shows none."""
    run = quadrant_runs["cvae"]
    shown = {k: v for k, v in cli_env.items() if k != "TQDM_DISABLE"}
    args = ["eval.samples=5", "eval.chunk=5", "eval.batch_size=50", "eval.tag=bar"]
    out = run_eval(run, shown, tmp_path, *args)
    assert out.returncode == 0, out.stderr[-3000:]
    bar = re.findall(r"test \(300 digits, 5 samples\): +\d+%.*?\| (\d+)/6 \[[\d:]+<[\d:?]+", out.stderr)
    assert bar and bar[-1] == "6", out.stderr[-2000:]  # six batches of 50, the time left after "<"
    quiet = run_eval(run, shown, tmp_path, *args, "eval.progress=false")
    assert quiet.returncode == 0 and "batch" not in quiet.stderr, quiet.stderr[-2000:]
