"""`cvae-sample`: PNG grids of the expected pixel sizes from a real run's best checkpoint, grey borders,
and the same grids in the run's TensorBoard events at the checkpoint's step."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import tbevents
from conftest import in_process, run_module
from PIL import Image

from cvae_exp.data.geometry import MNIST
from cvae_exp.sample import PANEL_GAP
from cvae_exp.training.grids import label_width

SIDE, PAD = 28, 1  # a digit and the border cvae_exp.runs.tensorboard.tile puts around it
STEPS = 30


def grid_px(rows: int, cols: int) -> tuple[int, int]:
    """(width, height) of a tile() grid: a 1-pixel border around every 28 x 28 digit."""
    return cols * (SIDE + PAD) + PAD, rows * (SIDE + PAD) + PAD


def scaled(size: tuple[int, int], scale: int) -> tuple[int, int]:
    return size[0] * scale, size[1] * scale


def run_sample(args, env, cwd) -> subprocess.CompletedProcess:
    """`cvae-sample *args` in this process; the last refusal below runs it as a new one."""
    return in_process("cvae_exp.sample", args, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, session_cli, small_overrides) -> dict[str, Path]:
    """Two real runs with a 2-d latent: the label condition (job 0) and the 2-quadrant task (job 1)."""
    out = tmp_path_factory.mktemp("sample") / "multirun"
    base = [o for o in small_overrides() if not o.startswith("model.latent_dim=")]
    proc = session_cli(
        [
            "-m",
            "data.condition=label,quadrants",
            "data.n_given=2",
            "model.latent_dim=2",
            *base,
            f"trainer.max_steps={STEPS}",
            "logger.images=false",
            f"hydra.sweep.dir={out}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"label": out / "0", "quadrants": out / "1"}


def sizes(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for f in sorted(folder.glob("*.png")):
        with Image.open(f) as img:
            out[f.stem] = img.size
    return out


def test_label_run_class_samples_reconstructions_and_latent_walk(runs, cli_env):
    run = runs["label"]
    proc = run_sample([f"run_dir={run}", "sample.cols=4", "sample.inputs=3", "sample.walk=5"], cli_env, run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [Path(line) for line in proc.stdout.split() if line.endswith(".png")]
    assert sorted(p.name for p in printed) == ["class_samples.png", "latent_walk.png", "reconstructions.png"]
    assert all(p.is_file() and p.parent == run / "samples" for p in printed)

    panel_w, panel_h = grid_px(5, 5)  # one 5 x 5 walk per digit, 2 rows of 5 panels with white gaps
    walk = (5 * panel_w + 6 * PANEL_GAP, 2 * panel_h + 3 * PANEL_GAP)
    margin = label_width(list(MNIST.class_names), MNIST)  # the class names, left of their rows
    grid_w, grid_h = grid_px(10, 4)
    assert sizes(run / "samples") == {
        "class_samples": scaled((margin + grid_w, grid_h), 2),  # one row per digit, sample.cols samples each
        "reconstructions": scaled(grid_px(2, 3), 2),  # inputs above, reconstructions below
        "latent_walk": scaled(walk, 2),
    }
    with Image.open(run / "samples" / "class_samples.png") as img:
        pixels = np.asarray(img)
    assert pixels.ndim == 2 and pixels[0, 2 * margin] == pixels[1, 2 * margin + 1] == 128  # the grey border, 2x scaled
    assert pixels[0, 0] == 255 and pixels[:, : 2 * margin].min() == 0  # white margin, black names

    tb = tbevents.load(run / "tb")
    for name in ("class_samples", "reconstructions", "latent_walk"):
        assert tb.images[f"samples/{name}"] == [STEPS]  # the best (only) checkpoint's step


def test_quadrant_run_completions(runs, cli_env):
    run = runs["quadrants"]
    proc = run_sample(
        [
            f"run_dir={run}",
            "sample.inputs=3",
            "sample.completions=2",
            "sample.walk=4",
            "sample.scale=1",
            "sample.out=pictures",
            "sample.tensorboard=false",
        ],
        cli_env,
        run,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sizes(run / "pictures") == {
        "completions": grid_px(3, 1 + 2 + 1),  # the condition, 2 samples, the truth
        "reconstructions": grid_px(2, 3),
        "latent_walk": grid_px(4, 4),  # one panel, conditioned on the first input
    }
    assert not any(t.startswith("samples/") for t in tbevents.load(run / "tb").images)


def test_not_a_run_dir_is_one_sentence_and_exit_2(tmp_path, cli_env):
    proc = run_sample([f"run_dir={tmp_path}"], cli_env, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and str(tmp_path) in lines[-1] and lines[-1].startswith("error:")
    proc = run_sample([f"run_dir={tmp_path / 'x'}", "sample.walk=0"], cli_env, tmp_path)
    assert proc.returncode == 2 and "sample.walk=0" in proc.stderr
    assert not (tmp_path / "x").exists(), "a mistyped run_dir is refused, not created"
    proc = run_module("cvae_exp.sample", [], env=cli_env, cwd=tmp_path)  # no run_dir at all, as a new process
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        "error: run_dir is missing: cvae-sample run_dir=<a cvae-train run directory> names the run to use."
    )
    assert not (tmp_path / "sample.log").exists()  # a refused command writes no log
