"""The Python API (cvae_exp.api): the command line's config, checks and run directory from a plain Python
call, the metrics returned, and a user error raised with its one sentence instead of exiting."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import shrunk


@pytest.fixture(scope="module")
def api_run(tiny_mnist, tmp_path_factory):
    from cvae_exp import api

    run_dir = tmp_path_factory.mktemp("api") / "run"
    metrics = api.train(shrunk(tiny_mnist, None, "trainer.max_steps=20", "logger.images=false"), run_dir=run_dir)
    return run_dir, metrics


def test_train_returns_the_metrics_it_writes_into_the_run_directory(api_run):
    run_dir, metrics = api_run
    assert metrics["step"] == 20 and metrics == json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    assert (run_dir / "checkpoints" / "20").is_dir()


def test_evaluate_and_sample_read_the_run(api_run):
    from cvae_exp import api

    run_dir, _ = api_run
    result = api.evaluate(run_dir, ["eval.samples=4", "eval.batch_size=100"])
    assert result["checkpoint_step"] == 20 and result == json.loads((run_dir / "eval.json").read_text())
    files = api.sample(run_dir)
    assert files and all(f.is_file() and f.suffix == ".png" for f in files)


@pytest.mark.parametrize(
    ("override", "sentence"),
    [("optimizer.lr=-1", "optimizer.lr=-1.0 must be positive."), ("trainer.max_stepz=3", "trainer.max_stepz")],
)
def test_a_user_error_raises_its_sentence_and_leaves_nothing(tiny_mnist, tmp_path, override, sentence):
    from cvae_exp import api
    from cvae_exp.errors import UserError

    with pytest.raises(UserError, match=sentence.replace(".", r"\.")):
        api.train(shrunk(tiny_mnist, None, override), run_dir=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_a_plain_python_c_trains(tiny_mnist, tmp_path, cli_env):
    code = (
        "from cvae_exp import api; "
        f"m = api.train({shrunk(tiny_mnist, None, 'trainer.max_steps=2', 'logger.images=false')!r}, run_dir={str(tmp_path / 'r')!r}); "
        "print('step', m['step'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "step 2"
