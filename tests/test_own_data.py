"""Your own data, end to end: an RGB image folder (32 x 32, 3 classes) trained with the discretized Gaussian,
resumed bit for bit, evaluated in bits per dimension and drawn as RGB PNGs with one labelled row per class;
a 20 x 36 grayscale Parquet set with other column names, every model kind on it; RGB quadrant completion;
mixed sizes refused (or resized); a resume on data of another geometry refused, naming both."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tbevents
from conftest import in_process
from own_data import CLASSES, write_image_folder, write_parquet_set
from PIL import Image

from cvae_exp.data import sources
from cvae_exp.data.decode import Columns
from cvae_exp.data.geometry import Geometry
from cvae_exp.errors import UserError
from cvae_exp.training.grids import label_width

STEPS, HALF = 30, 20
RGB = Geometry(32, 32, 3, 3, CLASSES)


def small(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.path={data}",
        "data.val_size=40",
        "model.hidden=[32]",
        "model.latent_dim=4",
        "trainer.batch_size=16",
        "trainer.eval_batch_size=50",
        "trainer.progress=false",
        "trainer.log_every=10",
        "trainer.eval_every=10",
        "checkpoint.every=10",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("own") / "shapes", n_train=150, n_test=30)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    return write_parquet_set(tmp_path_factory.mktemp("own") / "cells", n_train=120, n_test=30)


@pytest.fixture(scope="module")
def rgb_runs(folder, session_cli, tmp_path_factory) -> dict[str, Path]:
    """The done-when command, small: straight to STEPS, and to HALF then resumed to STEPS."""
    root = tmp_path_factory.mktemp("rgb")
    likelihood = ["data.binarize=none", "model.likelihood=discretized_gaussian"]
    ok(session_cli(small(folder, root / "straight", *likelihood, f"trainer.max_steps={STEPS}")))
    quiet = "logger.images=false"  # TensorBoard's grids: drawn in the straight run
    ok(session_cli(small(folder, root / "resumed", *likelihood, quiet, f"trainer.max_steps={HALF}")))
    ok(session_cli(small(folder, root / "resumed", "resume=true", quiet, f"trainer.max_steps={STEPS}")))
    return {"straight": root / "straight", "resumed": root / "resumed"}


def test_an_rgb_image_folder_trains_resumes_exactly_and_records_its_geometry(rgb_runs):
    straight = json.loads((rgb_runs["straight"] / "metrics.json").read_text())
    resumed = json.loads((rgb_runs["resumed"] / "metrics.json").read_text())
    assert straight["params_sha256"] == resumed["params_sha256"] and straight["step"] == STEPS
    assert straight["data_source"].startswith("imagefolder:") and math.isfinite(straight["test/elbo"])
    meta = json.loads((rgb_runs["straight"] / "checkpoints" / str(STEPS) / "meta" / "metadata").read_text())
    assert Geometry.from_record(meta["data"]["geometry"]) == RGB
    assert tbevents.load(rgb_runs["straight"] / "tb").images["val/samples"] == [10, 20, 30]


def test_eval_reports_nats_and_bits_per_dimension(rgb_runs, cli_env):
    run = rgb_runs["straight"]
    ok(in_process("cvae_exp.evaluate", [f"run_dir={run}", "eval.samples=4"], env=cli_env, cwd=run))
    result = json.loads((run / "eval.json").read_text())
    assert result["scored_pixels_per_example"] == 32 * 32 * 3 and result["likelihood"] == "discretized_gaussian"
    for name in ("ncll", "ncll_is", "ncll_mc", "neg_elbo"):
        assert result[f"{name}_bits_per_dim"] == pytest.approx(result[name] / (3072 * math.log(2)), rel=1e-9)
    assert 0 < result["ncll_bits_per_dim"] < 8  # below the 8 bits of a uniform guess: a probability of the data
    assert Geometry.from_record(result["geometry"]) == RGB


def test_sample_writes_rgb_pngs_a_labelled_row_per_class(rgb_runs, cli_env):
    run = rgb_runs["straight"]
    args = [f"run_dir={run}", "sample.cols=5", "sample.inputs=4", "sample.scale=1", "sample.tensorboard=false"]
    ok(in_process("cvae_exp.sample", args, env=cli_env, cwd=run))
    cell = 32 + 1
    with Image.open(run / "samples" / "class_samples.png") as img:
        assert img.mode == "RGB"
        assert img.size == (label_width(list(CLASSES), RGB) + 5 * cell + 1, 3 * cell + 1)  # a row per class
        pixels = np.asarray(img)
    margin = label_width(list(CLASSES), RGB)
    assert pixels[:, :margin].min() == 0 and pixels[0, 0].tolist() == [255, 255, 255]  # names, black on white
    with Image.open(run / "samples" / "reconstructions.png") as img:
        assert img.mode == "RGB" and img.size == (4 * cell + 1, 2 * cell + 1)


def test_a_grayscale_table_with_other_column_names_trains_every_model_kind(table, session_cli, tmp_path):
    assert sources.load(path=str(table)).geometry.classes == 0  # plain integer columns: no label column found
    columns = ["data.image_column=img", "data.label_column=fine_label"]
    data = sources.load(path=str(table), columns=Columns("img", "fine_label"))
    assert data.geometry == Geometry(20, 36, 1, 3, ("0", "1", "2")) and data.train_images.shape[1:] == (20, 36, 1)
    quick = ["trainer.max_steps=2", "trainer.eval_every=2", "checkpoint.enabled=false", "logger.images=false"]
    for kind, extra in [
        ("cvae", []),
        ("vae", ["data.binarize=none", "model.likelihood=discretized_logistic", "model.mixtures=2"]),
        ("gsnn", ["data.condition=quadrants"]),
        ("hybrid", ["data.binarize=none", "model.likelihood=gaussian"]),
        ("baseline", ["data.binarize=none", "model.likelihood=discretized_gaussian"]),
    ]:
        proc = ok(session_cli(small(table, tmp_path / kind, f"model={kind}", *columns, *quick, *extra)))
        assert "20x36x1" not in proc.stderr  # nothing refused
        assert math.isfinite(json.loads((tmp_path / kind / "metrics.json").read_text())["test/elbo"]), kind


def test_rgb_quadrant_completion(folder, session_cli, cli_env, tmp_path):
    run = tmp_path / "quadrants"
    extra = ["model=hybrid", "data.condition=quadrants", "data.n_given=2", "trainer.max_steps=10"]
    likelihood = ["data.binarize=none", "model.likelihood=discretized_logistic", "model.mixtures=2"]
    ok(session_cli(small(folder, run, *extra, *likelihood, "checkpoint.every=10", "logger.images=false")))
    args = [f"run_dir={run}", "sample.inputs=3", "sample.completions=2", "sample.scale=1", "sample.tensorboard=false"]
    ok(in_process("cvae_exp.sample", args, env=cli_env, cwd=run))
    with Image.open(run / "samples" / "completions.png") as img:
        assert img.mode == "RGB" and img.size == (4 * 33 + 1, 3 * 33 + 1)  # condition, 2 samples, truth
        pixels = np.asarray(img, np.float32) / 255.0
    condition = pixels[1:33, 1:33]  # the first input: the left half given, the right half grey in all channels
    assert np.allclose(condition[:, 16:], 0.25, atol=1 / 255) and not np.allclose(condition[:, :16], 0.25, atol=0.01)


def test_the_quadrant_mask_covers_every_channel_of_a_pixel():
    from cvae_exp.data.pipeline import quadrant_mask

    geometry = Geometry(4, 6, 3, 0)
    given = quadrant_mask(1, "left_first", geometry).reshape(4, 6, 3)  # 1: the bottom-left quadrant
    expected = np.zeros((4, 6), np.float32)
    expected[2:, :3] = 1.0
    np.testing.assert_array_equal(given, np.repeat(expected[..., None], 3, axis=-1))


def test_mixed_sizes_are_refused_naming_a_file_unless_resized(tmp_path):
    root = write_image_folder(tmp_path / "mixed", n_train=12, n_test=3)
    odd = root / "train" / CLASSES[1] / "0004.png"
    Image.fromarray(np.zeros((30, 32, 3), np.uint8)).save(odd)
    with pytest.raises(UserError, match=rf"holds images of different sizes: {odd} is 30x32 but .* is 32x32"):
        sources.load(path=str(root), cache_dir=str(tmp_path / "cache"))
    resized = sources.load(path=str(root), cache_dir=str(tmp_path / "cache"), columns=Columns(resize=(16, 8)))
    assert resized.geometry.shape == (16, 8, 3) and resized.train_images.shape[1:] == (16, 8, 3)


def test_a_folder_without_classes_works_unconditioned_and_is_refused_for_labels(tmp_path, session_cli):
    root = tmp_path / "flat"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (8, 6), dtype=np.uint8)).save(root / f"{i}.png")
    data = sources.load(path=str(root), cache_dir=str(tmp_path / "cache"))
    assert data.geometry == Geometry(8, 6, 1, 0) and len(data.test_images) == 6  # a test split carved: a tenth
    base = [
        "data.val_size=10",
        "trainer.batch_size=8",
        "model.hidden=[8]",
        "model.latent_dim=2",
        "trainer.progress=false",
    ]
    refused = session_cli([f"data.path={root}", *base, f"hydra.run.dir={tmp_path / 'refused'}"])
    assert refused.returncode == 2 and "has no class labels, so data.condition=label" in refused.stderr
    quick = ["trainer.max_steps=2", "checkpoint.enabled=false", "logger.images=false"]
    ok(session_cli([f"data.path={root}", *base, *quick, "data.condition=none", f"hydra.run.dir={tmp_path / 'vae'}"]))


def test_a_resume_on_data_of_another_geometry_is_refused_naming_both(rgb_runs, table, session_cli, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(rgb_runs["straight"], run)
    proc = session_cli(
        [
            f"hydra.run.dir={run}",
            "resume=true",
            f"data.path={table}",
            "data.label_column=fine_label",
            "resume_data_change=true",
            f"trainer.max_steps={STEPS + 10}",
        ]
    )
    assert proc.returncode == 2
    assert "20x36x1 (height x width x channels), 3 classes" in proc.stderr
    assert "trained on 32x32x3 (height x width x channels), 3 classes" in proc.stderr
