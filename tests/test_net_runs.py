"""Runs with other networks, end to end: the convolutional networks on the paper's quadrant task with the frozen
aid (trained, resumed bit for bit, evaluated, sampled; a resume with another network refused naming the key),
on an RGB image folder as a vmap launcher's members on four devices (cvae-bench's convolution FLOPs:
tests/test_nets.py; its `net` key: tests/test_bench.py);
and a user's module (docs/examples/mynets.py) built only when the command trusts its package."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from cli_runs import metrics
from conftest import REPO, in_process, run_module, shrunk
from own_data import write_image_folder

from cvae_exp import cli

assert cli.CONF_DIR  # importing cvae_exp.cli registers the config schemas that compose_config needs

# One level (28 -> 14 -> 28) compiles in a third of two levels' time; tests/test_nets.py traces deeper ones.
CONV = ["model/net=conv", "model.net.channels=[4]", "model.net.dense=[16]"]
QUICK = ["logger.images=false", "trainer.eval_every=10", "checkpoint.every=10"]
# experiment=sohn2015 (the paper's task: 1 quadrant, early stopping, the frozen aid), shrunk to the tiny data
SOHN = ["experiment=sohn2015", "data.val_size=200", "model.hidden=[32]", "model.latent_dim=4", "trainer.batch_size=32"]
SOHN += ["trainer.eval_batch_size=100", "trainer.progress=false", *CONV, *QUICK]


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sohn_runs(tiny_mnist, session_cli, tmp_path_factory) -> dict[str, Path]:
    """The conv baseline, the conv CVAE aided by it (20 steps), and a copy of that run as it was at step 10
    (checkpoint 20 and what was written after step 10 removed, as when a run stops there) resumed to 20."""
    root = tmp_path_factory.mktemp("conv_sohn")
    data = f"data.path={tiny_mnist}"
    ok(session_cli([*SOHN, data, "model=baseline", "trainer.max_steps=10", f"hydra.run.dir={root / 'baseline'}"]))
    aided = [*SOHN, data, f"model.baseline_run={root / 'baseline'}"]
    ok(session_cli([*aided, "trainer.max_steps=20", f"hydra.run.dir={root / 'cvae'}"]))
    shutil.copytree(root / "cvae", root / "resumed")
    shutil.rmtree(root / "resumed" / "checkpoints" / "20")
    (root / "resumed" / "metrics.json").unlink()
    ok(session_cli([*aided, "trainer.max_steps=20", f"hydra.run.dir={root / 'resumed'}", "resume=true"]))
    return {"baseline": root / "baseline", "cvae": root / "cvae", "resumed": root / "resumed"}


def test_the_conv_cvae_on_the_quadrant_task_trains_with_its_aid_and_resumes_exactly(sohn_runs):
    straight, resumed = metrics(sohn_runs["cvae"]), metrics(sohn_runs["resumed"])
    assert straight["step"] == 20 and math.isfinite(straight["test/elbo"])
    assert straight["params_sha256"] == resumed["params_sha256"]
    config = (sohn_runs["cvae"] / ".hydra" / "config.yaml").read_text()
    assert "cvae_exp.models.conv.ConvNet" in config and "baseline_frozen: true" in config


def test_eval_and_sample_rebuild_the_conv_networks(sohn_runs, cli_env):
    run = sohn_runs["cvae"]
    ok(in_process("cvae_exp.evaluate", [f"run_dir={run}", "eval.samples=4", "eval.chunk=2"], env=cli_env, cwd=run))
    result = json.loads((run / "eval.json").read_text())
    assert math.isfinite(result["ncll_is"]) and result["scored_pixels_per_example"] == 784 * 3 // 4
    args = [f"run_dir={run}", "sample.inputs=3", "sample.completions=2", "sample.tensorboard=false"]
    ok(in_process("cvae_exp.sample", args, env=cli_env, cwd=run))
    assert (run / "samples" / "completions.png").is_file()


@pytest.mark.parametrize(
    ("change", "named"),
    [("model/net=mlp", "model.net._target_"), ("model/net=conv model.net.channels=[8]", "model.net.channels")],
)
def test_a_resume_with_another_network_is_refused_naming_the_key(sohn_runs, session_cli, change, named):
    run = sohn_runs["resumed"]
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = session_cli([f"hydra.run.dir={run}", "resume=true", "trainer.max_steps=30", *change.split()])
    assert proc.returncode == 2 and f"trained with different {named}" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_conv_jobs_train_on_an_rgb_image_folder_on_four_devices_as_vmap_launcher_members(cli_env, tmp_path):
    """The 32 x 32 RGB folder of the data issue, two seeds as members of one vmapped program of the vmap
    launcher, every batch split over four (simulated) devices: one process for the three."""
    folder = write_image_folder(tmp_path / "shapes", n_train=80, n_test=20)
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=vmap", *shrunk(str(folder)), "data.val_size=20", "trainer.batch_size=16"]
    args += [*CONV, *QUICK, "data.binarize=none", "model.likelihood=discretized_gaussian", "trainer.max_steps=10"]
    args += ["seed=0,1", f"hydra.sweep.dir={sweep}"]
    env = {**cli_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    ok(run_module("cvae_exp.train", args, env=env, cwd=tmp_path))
    jobs = [metrics(sweep / str(n)) for n in range(2)]
    assert jobs[0]["group"]["partition"] == jobs[1]["group"]["partition"]  # one vmapped program
    assert jobs[0]["params_sha256"] != jobs[1]["params_sha256"]
    for job in jobs:
        assert job["devices"] == 4 and job["step"] == 10 and math.isfinite(job["test/elbo"])


# ----------------------------------------------------------------------------- a user's module

EXAMPLES = REPO / "docs" / "examples"
USER = ["model.net._target_=mynets.Joined", "+model.net.width=8", "+model.net.generation._target_=mynets.Painter"]


@pytest.fixture
def importable_examples(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as PYTHONPATH=docs/examples does for the command line
    yield
    sys.modules.pop("mynets", None)


def test_a_user_module_without_trust_is_refused_and_nothing_is_written(
    tiny_mnist, cli_env, tmp_path, importable_examples
):
    run = tmp_path / "run"
    proc = in_process("cvae_exp.train", shrunk(tiny_mnist, run, *USER), env=cli_env, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "trust_modules=[mynets]" in lines[0]
    assert not run.exists() and "mynets" not in sys.modules  # never imported


def test_a_trusted_user_module_trains_and_evaluates_and_every_command_names_the_trust(
    tiny_mnist, session_cli, cli_env, tmp_path, importable_examples
):
    """The worked example of docs/extending.md; every later command on the run must name the trust again."""
    run = tmp_path / "run"
    trust = "trust_modules=[mynets]"
    ok(session_cli(shrunk(tiny_mnist, run, *USER, trust, *QUICK, "trainer.max_steps=10")))
    params = json.loads((run / "checkpoints" / "10" / "meta" / "metadata").read_text())["config"]["model"]["net"]
    assert params == {"_target_": "mynets.Joined", "width": 8, "generation": {"_target_": "mynets.Painter"}}
    refused = session_cli([f"hydra.run.dir={run}", "resume=true", "trainer.max_steps=20"])
    assert refused.returncode == 2 and "trust_modules=[mynets]" in refused.stderr  # the saved config grants none
    refused = in_process("cvae_exp.evaluate", [f"run_dir={run}", "eval.samples=2"], env=cli_env, cwd=run)
    assert refused.returncode == 2 and "trust_modules=[mynets]" in refused.stderr
    ok(in_process("cvae_exp.evaluate", [f"run_dir={run}", "eval.samples=2", trust], env=cli_env, cwd=run))
    assert math.isfinite(json.loads((run / "eval.json").read_text())["ncll_is"])


def test_a_conv_baseline_with_another_output_bias_is_refused_as_the_aid(sohn_runs, tiny_mnist):
    """The MLP's output bias is its last layer's bias, the same parameters either way; a conv network's
    per-pixel output bias exists only with model.output_bias=data_logit: a conv baseline trained without it
    cannot be loaded into a CVAE that has it. Refused in one sentence naming both values."""
    from conftest import compose_config

    from cvae_exp.config import validate
    from cvae_exp.errors import UserError

    aided = [*SOHN, f"data.path={tiny_mnist}", f"model.baseline_run={sohn_runs['baseline']}"]
    validate(compose_config(aided))  # the baseline's own output bias: accepted
    with pytest.raises(UserError) as err:
        validate(compose_config([*aided, "model.output_bias=data_logit"]))
    said = str(err.value)
    assert "model.output_bias=zero" in said and "model.output_bias=data_logit" in said and "ConvNet" in said
