"""Issue 6, bad input: every impossible value, bad data folder and unsafe `_target_` is refused with one
sentence naming the key and the value, exit code 2 and no traceback, before devices, data or
compilation; and nothing in the package unpickles.

Each case runs in-process through the entry point's own error handling, with the run's body replaced
by a tripwire, so "before any work" is checked exactly; data cases also run through the real CLI
(test_config.py runs the config-value and `_target_` cases there).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import IMPOSSIBLE, in_process, run_module
from conftest import compose_config as make_cfg
from omegaconf import OmegaConf

import cvae_exp.runs.job
from cvae_exp.cli import exit_on_user_error
from cvae_exp.train import train

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


def write_parquet(root: Path, side: int = 28, label_column: str = "label") -> Path:
    """A Hub-layout folder of `side` x `side` digits, the label stored under `label_column`."""
    import datasets

    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), label_column: datasets.Value("int64")})
    (root / "mnist").mkdir(parents=True)
    for split, n in (("train", 40), ("test", 10)):
        images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        rows = {"image": list(images), label_column: (np.arange(n) % 10).tolist()}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(root / "mnist" / f"{split}-00000-of-00001.parquet")
        )
    return root


def write_mixed(root: Path) -> Path:
    """A Hub-layout folder of 28 x 28 training images and 30 x 30 test images: sizes that differ."""
    write_parquet(root)
    other = write_parquet(root.parent / f"{root.name}_30", side=30)
    (root / "mnist" / "test-00000-of-00001.parquet").write_bytes(
        (other / "mnist" / "test-00000-of-00001.parquet").read_bytes()
    )
    return root


def write_broken(root: Path, *, image: bytes | None = None, label: int | None = None, garbage: bool = False) -> Path:
    """A Hub-layout folder whose train split has, at row 7, `image` bytes and/or the `label`; or (`garbage`)
    a train "Parquet" file that is not Parquet at all."""
    import datasets

    write_parquet(root)
    train = root / "mnist" / "train-00000-of-00001.parquet"
    if garbage:
        train.write_bytes(b"PAR1" + bytes(range(256)) * 8)  # the magic number, then nothing Parquet
        return root
    ds = datasets.Dataset.from_parquet(str(train))
    rows = ds.cast_column("image", datasets.Image(decode=False)).to_dict()
    if image is not None:
        rows["image"][7] = {"bytes": image, "path": None}
    if label is not None:
        rows["label"][7] = label
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(train))
    return root


def write_idx(root: Path, n_train: int = 40, n_test: int = 10) -> Path:
    """A folder of the four MNIST IDX files (uncompressed) with `n_train` / `n_test` random digits."""
    import struct

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">HBBIII", 0, 8, 3, n, 28, 28) + images.tobytes()
        )
        labels = (np.arange(n) % 10).astype(np.uint8)
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">HBBI", 0, 8, 1, n) + labels.tobytes())
    return root


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad_data")
    return {
        "no_test": str(write_idx(root / "no_test", n_test=0)),
        "missing": str(root / "no_such_folder"),
        "nolabel": str(write_parquet(root / "nolabel", label_column="digit")),
        "mixed": str(write_mixed(root / "mixed")),
        "garbage": str(write_broken(root / "garbage", garbage=True)),
        "undecodable": str(write_broken(root / "undecodable", image=b"\x89PNG\r\n\x1a\n but then nothing")),
        "label": str(write_broken(root / "label", label=2**40)),  # an int32 cast would make it 0
    }


# (overrides, what the one sentence must contain); <name> stands for a folder from `bad_data`
CASES = [
    *IMPOSSIBLE,
    (["model.alpha=-0.5"], "model.alpha=-0.5"),
    (["data.condition=quadrants", "data.n_given=0"], "data.n_given=0"),
    (["data.path=<missing>"], "data.path=<missing> does not exist"),
    (["data.path=<nolabel>"], "data.path=<nolabel> has no 'label' column"),
    (["data.path=<nolabel>", "data.image_column=picture"], "data.image_column=picture is not a column of data.path="),
    (["data.binarize=none"], "model.likelihood=bernoulli scores binarized pixels, but data.binarize=none"),
    (["model.likelihood=gaussian"], "model.likelihood=gaussian is a density of continuous values"),
    (["data.resize=[0,4]"], "data.resize=[0, 4] must be [height, width]"),
    (
        ["data.path=<garbage>"],
        "data.path=<garbage>: <garbage>/mnist/train-00000-of-00001.parquet is not a readable Parquet file",
    ),
    # Hydra accepts a new key added with +; the schema does not
    (["+trainer.max_stepz=5"], "trainer.max_stepz is not a config key"),
    (["+seedz=1"], "seedz is not a config key"),
    (["optimizer._target_=builtins.eval"], "optimizer._target_=builtins.eval is refused"),
    # past the prefix check: an attribute chain from an allowed module to os.system
    (["optimizer.transform._target_=cvae_exp.data.sources.os.system"], "sources.os.system is refused"),
    # instantiate also builds targets inside lists
    (["+optimizer.transform.extra=[{_target_:os.getpid}]"], "optimizer.transform.extra[0]._target_=os.getpid"),
    # NaN passes every comparison; infinities mean nothing here: every float key must be finite
    (["optimizer.lr=nan"], "optimizer.lr=nan must be a finite number"),
    (["model.beta=inf"], "model.beta=inf must be a finite number"),
    (["optimizer.clip_norm=nan"], "optimizer.clip_norm=nan must be a finite number"),
    (["optimizer.transform.b1=-inf"], "optimizer.transform.b1=-inf must be a finite number"),
    (["trainer.min_delta=nan"], "trainer.min_delta=nan must be a finite number"),
    (["model.kl_warmup_steps=1000000000000000000"], "model.kl_warmup_steps=1000000000000000000 is beyond the step"),
    # interpolations that cannot be resolved, refused by name before anything reads them
    (["model.beta=${model.beta}"], "model.beta=${model.beta} cannot be resolved: Recursive interpolation"),
    (["data.hub=${oc.env:CVAE_TEST_UNSET}"], "data.hub=${oc.env:CVAE_TEST_UNSET} cannot be resolved"),
    (["model.hidden=[8,${nope}]"], "model.hidden[1]=${nope} cannot be resolved"),
]


def fill(text: str, folders: dict[str, str]) -> str:
    for name, folder in folders.items():
        text = text.replace(f"<{name}>", folder)
    return text


@pytest.mark.parametrize(
    "overrides, named", CASES, ids=[c[0][-1].split("=")[0] + "=" + c[0][-1].split("=", 1)[1][:30] for c in CASES]
)
def test_bad_input_is_refused_before_any_work(overrides, named, bad_data, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # where a run that got through would put its lock

    def tripwire(cfg, run_dir):
        raise AssertionError("the run started (devices, data, compilation) despite bad input")

    monkeypatch.setattr(cvae_exp.runs.job, "_train", tripwire)
    cfg = make_cfg([fill(o, bad_data) for o in overrides])
    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(train)(cfg)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fill(named, bad_data) in lines[0]
    assert not (tmp_path / ".lock").exists()


def test_cli_refuses_bad_data_with_one_sentence(tiny_mnist, bad_data, cli_env, tmp_path):
    base = ["data.val_size=200", "trainer.progress=false", "model.hidden=[32]", "model.latent_dim=4"]
    cases = {
        "missing": ([f"data.path={bad_data['missing']}"], f"data.path={bad_data['missing']} does not exist"),
        # Sizes are compared while the images are decoded: one file (here a row of it) and its size are named.
        "mixed": (
            [f"data.path={bad_data['mixed']}"],
            f"data.path={bad_data['mixed']} holds images of different sizes: row 0 of {bad_data['mixed']}/mnist/"
            "test-00000-of-00001.parquet is 30x30 but row 0 of",
        ),
        # The split's size is known only once the data is read: refused then, before anything is compiled.
        "batch": (
            [f"data.path={tiny_mnist}", "trainer.batch_size=2000"],
            "trainer.batch_size=2000 is larger than the training split (1000 images)",
        ),
        # Known once the data is read, before the first step (they trained, then failed at the final evaluation).
        "no_test": (
            [f"data.path={bad_data['no_test']}", "data.val_size=10", "trainer.batch_size=10"],
            f"data.path={bad_data['no_test']} holds no test images",
        ),
        "eval_batch": (
            [f"data.path={tiny_mnist}", "trainer.eval_batch_size=1000000000"],
            "trainer.eval_batch_size=1000000000 needs at least 23,365 GiB for one evaluation batch, more than the",
        ),
        # Found while decoding, before anything is compiled: the file and the row are named.
        "undecodable": (
            [f"data.path={bad_data['undecodable']}"],
            f"data.path={bad_data['undecodable']}: row 7 of {bad_data['undecodable']}/mnist/train-00000-of-00001.parquet "
            "is not a decodable image (",
        ),
    }
    # The first as a new process, as users run it; the others in this process (conftest's in_process).
    for name, (args, _) in cases.items():
        run = run_module if name == "missing" else in_process
        done = run("cvae_exp.train", [*base, *args, f"hydra.run.dir={tmp_path / name}"], env=cli_env, cwd=tmp_path)
        code, out, err = done.returncode, done.stdout, done.stderr
        assert code == 2, f"{name}: {err[-3000:]}"
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {err}"
        assert cases[name][1] in lines[0]
        assert "Traceback" not in out + err
        assert "Data:" not in out  # the data was never handed to training
        assert not (tmp_path / name).exists()  # refused: the run directory Hydra made is gone again


@pytest.mark.parametrize("bad", ["model.beta=${model.beta}", "data.path=${oc.env:CVAE_TEST_UNSET}", "optimizer.lr=nan"])
def test_a_refused_launch_leaves_no_run_directory(bad, tiny_mnist, cli_env, tmp_path):
    """Through Hydra, which makes the run directory before the task runs: refused, it is gone again."""
    run_dir = tmp_path / "outputs" / "run"
    args = [f"data.path={tiny_mnist}", "trainer.progress=false", bad, f"hydra.run.dir={run_dir}"]
    done = in_process("cvae_exp.train", args, env=cli_env, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad.split('=')[0]}="), done.stderr
    assert not (tmp_path / "outputs").exists()


# What each command's pre-flight refuses from the config or the file system alone.
REFUSED_BEFORE_JAX = [
    ("cvae_exp.train", ["optimizer.lr=0"], "optimizer.lr=0"),
    ("cvae_exp.train", ["data.path=/nonexistent/mnist"], "data.path=/nonexistent/mnist does not exist"),
    ("cvae_exp.evaluate", ["run_dir=/nonexistent/run"], "run_dir=/nonexistent/run is not a cvae-train run"),
    ("cvae_exp.sample", ["run_dir=RUN_WITHOUT_CHECKPOINTS"], "holds no checkpoints/ folder"),
    ("cvae_exp.bench", ["trainer.batch_size=0"], "trainer.batch_size=0"),
]


def test_a_refused_command_never_starts_jax(cli_env, tmp_path):
    """The pre-flight needs only the config and the file system: a refusal comes before JAX, Orbax or the
    data libraries load (a new process per command, as users run it; `jax` not in sys.modules at its exit)."""
    no_checkpoints = tmp_path / "no_checkpoints"
    (no_checkpoints / ".hydra").mkdir(parents=True)
    (no_checkpoints / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(make_cfg()))
    for module, args, named in REFUSED_BEFORE_JAX:
        args = [a.replace("RUN_WITHOUT_CHECKPOINTS", str(no_checkpoints)) for a in args]
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
        code = (
            "import atexit, runpy, sys\n"
            "atexit.register(lambda: print('loaded:', *sorted({'jax', 'orbax', 'datasets'} & set(sys.modules)),"
            " file=sys.stderr))\n"
            f"sys.argv = [{module!r}, *{args!r}]\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], env=cli_env, cwd=tmp_path, capture_output=True, text=True)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and lines[0].startswith("error: ") and named in lines[0], (module, done.stderr)
        assert lines[1:] == ["loaded:"], (module, done.stderr)  # nothing of JAX, Orbax or datasets


def test_data_found_bad_while_decoding_names_the_file_and_row(bad_data, tmp_path):
    """In process (the CLI case above covers the undecodable image): what is found only while the data is
    decoded, and a label that an int32 cast would have wrapped to 0."""
    from cvae_exp.data import sources
    from cvae_exp.errors import UserError

    for name, named in [
        ("undecodable", "<undecodable>: row 7 of <undecodable>/mnist/train-00000-of-00001.parquet is not a decodable"),
        ("label", "<label> has a train label 1099511627776 at row 7 of <label>/mnist/train-00000-of-00001.parquet, "),
    ]:
        with pytest.raises(UserError) as err:
            sources.load(path=bad_data[name], cache_dir=str(tmp_path))
        assert fill(f"data.path={named}", bad_data) in str(err.value) and "\n" not in str(err.value)


def test_nothing_in_the_package_unpickles():
    sources = {p.relative_to(REPO): p.read_text() for p in (REPO / "cvae_exp").rglob("*.py")}
    for path, text in sources.items():
        assert not re.search(
            r"\bpickle\b|cloudpickle|\bdill\b|joblib\.load|torch\.load|allow_pickle\s*=\s*True", text
        ), path
        for call in re.finditer(r"np\.load\(([^)]*)\)", text):
            assert "allow_pickle=False" in call.group(1), f"{path}: {call.group(0)}"
