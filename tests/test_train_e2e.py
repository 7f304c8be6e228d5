"""`cvae-train` end to end on the tiny dataset: the run directory it writes, resuming with a continuous curve,
refusing to overwrite a run, and learning something.

One module-scoped scenario runs the CLI five times (about half a minute on two cores), and the tests
check what each left behind:
  first     60 steps into run/        (evaluations and checkpoints at 30 and 60)
  refused   the same run dir again without resume=true (must exit 2 and touch nothing)
  resumed   resume=true up to 90 steps in run/
  straight  90 steps uninterrupted in straight/ (the curve the resumed run must reproduce)
  rerun     straight/ again with resume=true: a finished run, nothing left to train
"""

from __future__ import annotations

import math

import pytest
import tbevents
from cli_runs import metrics, tree_digest

FIRST, TOTAL, EVAL, LOG = 60, 90, 30, 10


def checked(result, what: str):
    assert result.returncode == 0, (
        f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def scenario(session_cli, small_overrides, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    run, straight = root / "run", root / "straight"
    s = {"run": run, "straight": straight}
    cli = session_cli  # the session's XLA compilation cache (conftest) serves the four runs

    s["first"] = cli(small_overrides(run, f"trainer.max_steps={FIRST}"))
    if s["first"].returncode != 0:
        return s  # every test reports the failure through `first`
    s["first_metrics"] = metrics(run)
    s["first_tb"] = tbevents.load(run / "tb")
    s["first_tb_files"] = tbevents.event_files(run / "tb")
    before = {
        "checkpoints": tree_digest(run / "checkpoints"),
        "tb": tree_digest(run / "tb"),
        "metrics": (run / "metrics.json").read_bytes(),
        "record": tree_digest(run / ".hydra"),  # the run's config and overrides, as trained
        "log": (run / "train.log").read_bytes(),
    }

    s["refused"] = cli(small_overrides(run, f"trainer.max_steps={TOTAL}"))
    s["after_refusal"] = {
        "checkpoints": tree_digest(run / "checkpoints"),
        "tb": tree_digest(run / "tb"),
        "metrics": (run / "metrics.json").read_bytes(),
        "record": tree_digest(run / ".hydra"),
        "log": (run / "train.log").read_bytes(),
    }
    s["before_refusal"] = before

    s["resumed"] = cli(small_overrides(run, f"trainer.max_steps={TOTAL}", "resume=true"))
    if s["resumed"].returncode == 0:
        s["resumed_metrics"] = metrics(run)
        s["resumed_tb_files"] = tbevents.event_files(run / "tb")
        s["resumed_checkpoints"] = tree_digest(run / "checkpoints")

    s["straight_run"] = cli(small_overrides(straight, f"trainer.max_steps={TOTAL}"))
    if s["straight_run"].returncode == 0:
        s["straight_metrics"] = metrics(straight)
        s["straight_tb"] = tbevents.load(straight / "tb")
        # A finished run started again with resume=true (a requeued job, a repeated command): nothing to train.
        s["rerun_finished"] = cli(small_overrides(straight, f"trainer.max_steps={TOTAL}", "resume=true"))
        s["rerun_metrics"] = metrics(straight)
    return s


@pytest.fixture(scope="module")
def first(scenario):
    checked(scenario["first"], "the first run")
    return scenario


@pytest.fixture(scope="module")
def resumed(first):
    checked(first["resumed"], "the resumed run")
    return first


# ----------------------------------------------------------------------------- the first run


def test_first_run_writes_the_run_directory(first):
    run = first["run"]
    assert (run / ".hydra" / "config.yaml").is_file()
    assert {p.name for p in (run / "checkpoints").iterdir() if p.is_dir()} >= {"30", "60"}
    assert first["first_tb_files"], "no event files directly in tb/"
    assert "Traceback" not in first["first"].stderr


def test_tensorboard_has_the_curves_and_images(first):
    tb = first["first_tb"]
    for tag in ("train/elbo", "train/kl", "train/recon"):
        assert tb.steps(tag) == list(range(LOG, FIRST + 1, LOG)), tag
    for tag in ("val/elbo", "val/kl", "val/recon"):
        assert tb.steps(tag) == list(range(EVAL, FIRST + 1, EVAL)), tag
    assert any(tag.startswith("train/") and "lr" in tag for tag in tb.scalars), sorted(tb.scalars)
    assert any("examples" in tag and ("per_s" in tag or "/s" in tag) for tag in tb.scalars), sorted(tb.scalars)
    lr = next(t for t in tb.scalars if t.startswith("train/") and "lr" in t)
    assert all(v == pytest.approx(1e-3) for v in tb.values(lr))  # the default adam: constant 1e-3
    assert all(math.isfinite(v) for tag in tb.scalars for v in tb.values(tag))
    images = tb.image_tags
    assert any("recon" in tag for tag in images), images
    assert any("sample" in tag for tag in images), images
    for tag in images:
        assert tb.images[tag] == list(range(EVAL, FIRST + 1, EVAL)), tag


def test_metrics_json_is_one_flat_object_consistent_with_the_curves(first):
    metrics = first["first_metrics"]
    assert isinstance(metrics, dict)
    assert all(not isinstance(v, (dict, list)) for v in metrics.values()), metrics
    assert metrics["step"] == FIRST
    for key in ("val/elbo", "val/kl", "val/recon", "devices", "examples_per_s"):
        assert key in metrics, key
    assert metrics["val/elbo"] == pytest.approx(metrics["val/recon"] + metrics["val/kl"], rel=1e-5)
    assert metrics["val/kl"] >= 0 and metrics["val/recon"] > 0
    assert isinstance(metrics["devices"], int) and metrics["devices"] >= 1
    assert metrics["examples_per_s"] > 0
    # The final numbers are the last evaluation's, as logged.
    tb = first["first_tb"]
    assert metrics["val/elbo"] == pytest.approx(tb.values("val/elbo")[-1], rel=1e-6)


def test_the_model_learns(first):
    tb = first["first_tb"]
    val = dict(tb.scalars["val/elbo"])
    assert val[60] < val[30]
    assert val[60] < tb.values("train/elbo")[0]
    train = tb.values("train/elbo")
    assert train[-1] < train[0]


# ----------------------------------------------------------------------------- refusing to overwrite


def test_rerun_without_resume_refuses_and_touches_nothing(first):
    refused = first["refused"]
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "resume" in lines[0], refused.stderr
    assert "Traceback" not in refused.stderr + refused.stdout
    assert first["after_refusal"] == first["before_refusal"]


# ----------------------------------------------------------------------------- resuming


def test_resume_continues_to_the_new_max_steps(resumed):
    run = resumed["run"]
    metrics = resumed["resumed_metrics"]
    assert metrics["step"] == TOTAL
    assert (run / "checkpoints" / str(TOTAL)).is_dir()
    assert "Traceback" not in resumed["resumed"].stderr
    # Nothing the first run left was rewritten: its checkpoints are still there, byte for byte.
    now = resumed["resumed_checkpoints"]
    for path, digest in resumed["before_refusal"]["checkpoints"].items():
        assert now.get(path) == digest, path


def test_resumed_curve_is_continuous(resumed):
    files = resumed["resumed_tb_files"]
    old = resumed["first_tb_files"]
    new = [f for f in files if f not in old]
    assert len(new) == 1, files
    # tensorboardX opens the new file with SessionLog.START at the purge step: the step after the restored one.
    assert tbevents.purge_steps(new[0]) == [FIRST + 1]
    assert all(tbevents.purge_steps(f) == [] for f in old)
    tb = tbevents.summaries(files)
    steps = tb.steps("train/elbo")
    assert len(steps) == len(set(steps))
    assert sorted(steps) == list(range(LOG, TOTAL + 1, LOG))
    assert tb.steps("val/elbo") == [30, 60, 90]
    # Without the purge the first run's events up to step 60 are all kept (nothing past it existed).
    assert tbevents.summaries(files, apply_purge=False).steps("train/elbo") == steps


@pytest.fixture(scope="module")
def straight(resumed):
    checked(resumed["straight_run"], "the uninterrupted run")
    return resumed


def test_resumed_run_reproduces_the_uninterrupted_curve(straight):
    resumed = straight
    again = tbevents.summaries(resumed["resumed_tb_files"])
    straight = resumed["straight_tb"]
    for tag in ("train/elbo", "train/kl", "val/elbo"):
        got, want = dict(again.scalars[tag]), dict(straight.scalars[tag])
        assert got.keys() == want.keys(), tag
        for step, value in got.items():
            assert value == pytest.approx(want[step], rel=1e-4, abs=1e-4), (tag, step)
    a, b = resumed["resumed_metrics"], resumed["straight_metrics"]
    for key in ("val/elbo", "val/kl", "val/recon"):
        assert a[key] == pytest.approx(b[key], rel=1e-4), key


def test_resuming_a_finished_run_keeps_its_metrics(straight):
    checked(straight["rerun_finished"], "the rerun of a finished run")
    before, after = straight["straight_metrics"], straight["rerun_metrics"]
    assert after["step"] == before["step"] == TOTAL
    for key in ("val/elbo", "val/kl", "val/recon"):
        assert key in after, f"{key} lost from metrics.json"
        assert after[key] == pytest.approx(before[key], rel=1e-5), key


def test_a_gaussian_run_says_what_its_elbo_means(tiny_mnist, cli_env, tmp_path):
    """model.likelihood=gaussian data.binarize=none printed val/elbo -1068 with no word: a density of pixel
    values, bounded below by the variance floor. The run now says so when it starts, with that bound."""
    from cli_runs import metrics, tiny, train

    from cvae_exp.runs.metrics import likelihood_note

    assert likelihood_note("bernoulli", -6.0) is None
    note = likelihood_note("gaussian", -6.0)
    assert "-2.08 per pixel (-1,632 per 28x28 image)" in note  # 784 * (log(2 pi) - 6) / 2
    run = tmp_path / "run"
    changes = {"model.likelihood": "gaussian", "data.binarize": "none", "trainer.max_steps": 4, "checkpoint.every": 4}
    code, text = train(tiny(tiny_mnist, run, changes), cli_env, tmp_path / "run.log")
    assert code == 0, text[-3000:]
    assert note in text and note in (run / "train.log").read_text()
    assert metrics(run)["val/elbo"] > 784 * -2.08  # no better than the floor
