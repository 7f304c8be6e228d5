"""Tests for cvae_exp.data.sources: IDX and Parquet folders, the cache, errors, and the offline fallback.
(Image folders, other column names, RGB, sizes and the geometry: tests/test_own_data.py.)"""

from __future__ import annotations

import gzip
import logging
import re
import shutil
import struct
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from cvae_exp.data import sources
from cvae_exp.data.decode import Columns
from cvae_exp.data.geometry import MNIST
from cvae_exp.errors import UserError

SHARED = Path(__file__).resolve().parents[2] / "shared/data/mnist"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"full MNIST not present at {SHARED}")
FEATURES = datasets.Features(
    {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    """Keep datasets' Arrow copies and our npz cache out of the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("CVAE_EXP_CACHE", str(tmp_path / "npz_cache"))


def _digits(n: int, side: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, side, side), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)


def _write_idx(file: Path, array: np.ndarray) -> None:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    file.write_bytes(gzip.compress(raw) if file.suffix == ".gz" else raw)


def _write_parquet(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], label_column: str = "label") -> Path:
    """Write the Hub layout (<root>/mnist/<split>-00000-of-00001.parquet) with datasets itself."""
    features = datasets.Features({"image": datasets.Image(), label_column: FEATURES["label"]})
    (root / "mnist").mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        rows = {"image": [Image.fromarray(x) for x in images], label_column: labels.tolist()}
        ds = datasets.Dataset.from_dict(rows, features=features)
        ds.to_parquet(str(root / "mnist" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture
def tiny_parquet(tmp_path):
    splits = {"train": _digits(64, seed=1), "test": _digits(32, seed=2)}
    return _write_parquet(tmp_path / "tiny", splits), splits


def _assert_equal(data: sources.RawData, splits: dict) -> None:
    for split, (images, labels) in splits.items():
        got_images, got_labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        assert got_images.dtype == np.uint8 and got_labels.dtype == np.int32
        np.testing.assert_array_equal(got_images, images[..., None])  # [N, H, W, 1]: one channel
        np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_folder_round_trips(tmp_path, suffix):
    splits = {"train": _digits(50, seed=3), "test": _digits(20, seed=4)}
    for key, stem in sources.IDX_NAMES.items():
        split, kind = key.split("_")
        _write_idx(tmp_path / (stem + suffix), splits[split][0 if kind == "images" else 1].astype(np.uint8))
    data = sources.load(path=str(tmp_path))
    _assert_equal(data, splits)
    assert data.source == f"idx:{tmp_path.resolve()}" and data.geometry == MNIST
    with pytest.raises(UserError, match=r"holds IDX files, arrays without columns .* unset data\.image_column"):
        sources.load(path=str(tmp_path), columns=Columns(resize=(14, 14)))


def test_an_idx_file_the_file_system_refuses_is_a_storage_error(tmp_path):
    """Exit 74 (the file system), not 2 (bad data): a folder where the file should be cannot be read."""
    from cvae_exp.errors import StorageError

    where = tmp_path / "train-images-idx3-ubyte"
    where.mkdir()
    with pytest.raises(StorageError, match=re.escape(f"The file system refused {where}: Is a directory (EISDIR).")):
        sources.read_idx(where)


def test_read_idx_rejects_truncated_and_wrong_magic(tmp_path):
    good = tmp_path / "good-idx3-ubyte"
    _write_idx(good, _digits(5)[0])
    truncated = tmp_path / "truncated-idx3-ubyte.gz"
    truncated.write_bytes(gzip.compress(good.read_bytes()[:-7]))
    cut_gzip = tmp_path / "cut-idx3-ubyte.gz"
    cut_gzip.write_bytes(gzip.compress(good.read_bytes())[:-20])
    wrong_magic = tmp_path / "magic-idx3-ubyte"
    wrong_magic.write_bytes(b"\x00\x00\x0d\x03" + good.read_bytes()[4:])
    assert sources.read_idx(good).shape == (5, 28, 28)
    for bad in (truncated, cut_gzip, wrong_magic):
        with pytest.raises(UserError, match=bad.name):
            sources.read_idx(bad)


def test_parquet_folder_loads_exactly_and_then_from_cache(tiny_parquet, tmp_path, monkeypatch):
    root, splits = tiny_parquet
    first = sources.load(path=str(root), cache_dir=str(tmp_path / "cache"))
    _assert_equal(first, splits)
    assert first.source == f"parquet:{root.resolve()}"
    assert len(list((tmp_path / "cache").glob("raw-*.npz"))) == 1

    monkeypatch.setattr(sources, "_decode", lambda *a: pytest.fail("decoded again despite the cache"))
    second = sources.load(path=str(root), cache_dir=str(tmp_path / "cache"))
    _assert_equal(second, splits)
    assert second.source == first.source


def test_corrupt_cache_is_ignored_and_rewritten(tiny_parquet, tmp_path):
    root, splits = tiny_parquet
    sources.load(path=str(root), cache_dir=str(tmp_path / "cache"))
    (cache,) = (tmp_path / "cache").glob("raw-*.npz")
    cache.write_bytes(b"not a zip file")
    _assert_equal(sources.load(path=str(root), cache_dir=str(tmp_path / "cache")), splits)
    with np.load(cache, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["train_images"], splits["train"][0][..., None])


def test_changed_files_invalidate_the_cache(tiny_parquet, tmp_path):
    root, _ = tiny_parquet
    sources.load(path=str(root), cache_dir=str(tmp_path / "cache"))
    new = {"train": _digits(64, seed=5), "test": _digits(32, seed=6)}
    _write_parquet(root, new)
    _assert_equal(sources.load(path=str(root), cache_dir=str(tmp_path / "cache")), new)


def test_bad_paths_raise_user_errors_naming_data_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "partial").mkdir()
    _write_idx(tmp_path / "partial" / "train-images-idx3-ubyte.gz", _digits(2)[0])
    cases = {
        "missing": "does not exist",
        "file.txt": "is not a directory",
        "empty": "neither Parquet",
        "partial": "t10k-labels-idx1-ubyte",
    }
    for name, reason in cases.items():
        with pytest.raises(UserError, match=rf"^data\.path=.*{name}.*{reason}"):
            sources.load(path=str(tmp_path / name))


def test_a_class_label_column_is_found_by_its_type_and_a_plain_one_only_by_name(tmp_path):
    images, labels = _digits(8)
    root = _write_parquet(tmp_path / "digit", {"train": (images, labels), "test": (images, labels)}, "digit")
    data = sources.load(path=str(root))  # "digit" is the ClassLabel column: the labels, with their names
    _assert_equal(data, {"train": (images, labels), "test": (images, labels)})
    assert data.geometry == MNIST
    # A column of plain integers under another name is no label column unless named; a label condition needs one.
    plain = tmp_path / "plain"
    shutil.copytree(root, plain)
    for file in (plain / "mnist").glob("*.parquet"):
        ds = datasets.Dataset.from_parquet(str(file))
        ds.cast_column("digit", datasets.Value("int64")).to_parquet(str(file))
    with pytest.raises(UserError, match=r"^data\.path=.*plain has no 'label' column and no ClassLabel feature in"):
        sources.check_path(str(plain), needs_labels=True)
    sources.check_path(str(plain), Columns(label="digit"), needs_labels=True)
    named = sources.load(path=str(plain), columns=Columns(label="digit"))
    assert named.geometry.classes == 10 and named.geometry.class_names == MNIST.class_names
    unlabelled = sources.load(path=str(plain))
    assert unlabelled.geometry.classes == 0 and not unlabelled.train_labels.any()
    with pytest.raises(UserError, match=r"^data\.label_column=fine is not a column of data\.path="):
        sources.load(path=str(plain), columns=Columns(label="fine"))


def test_a_missing_test_split_is_carved_from_train_the_same_every_time(tmp_path):
    images, labels = _digits(40)
    root = _write_parquet(tmp_path / "trainonly", {"train": (images, labels)})
    data = sources.load(path=str(root), cache_dir=str(tmp_path / "a"))
    assert len(data.test_images) == 4 and len(data.train_images) == 36  # one in sources.TEST_SHARE
    assert "test split carved from train: 4 of 40" in data.source
    together = np.concatenate([data.train_images, data.test_images])[..., 0]
    assert sorted(map(bytes, together)) == sorted(map(bytes, images))  # every image once, in one split or the other
    again = sources.load(path=str(root), cache_dir=str(tmp_path / "b"))  # decoded afresh: the same split
    np.testing.assert_array_equal(again.test_images, data.test_images)


def test_any_size_is_read_with_its_geometry(tmp_path):
    splits = {"train": _digits(8, side=32), "test": _digits(4, side=32)}
    data = sources.load(path=str(_write_parquet(tmp_path / "big", splits)))
    _assert_equal(data, splits)
    assert data.geometry.shape == (32, 32, 1) and data.geometry.classes == 10


def _assert_bundled(data: sources.RawData) -> None:
    assert data.source == "bundled sample (10000 train / 2000 test)"
    assert data.train_images.shape == (10_000, 28, 28, 1) and data.test_images.shape == (2_000, 28, 28, 1)
    assert data.geometry == MNIST
    assert data.train_images.dtype == np.uint8 and data.train_labels.dtype == np.int32
    assert set(np.unique(data.train_labels)) == set(np.unique(data.test_labels)) == set(range(10))


def test_unreachable_hub_falls_back_to_bundled_sample_with_one_warning(monkeypatch, caplog):
    real_load_dataset = datasets.load_dataset

    def hub_down(path, *args, **kwargs):
        if not Path(path).is_dir():
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub")
        return real_load_dataset(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", hub_down)
    with caplog.at_level(logging.WARNING, logger=sources.__name__):
        _assert_bundled(sources.load("mnist"))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == sources.__name__]
    assert len(warnings) == 1 and "data.path=" in warnings[0].getMessage()
    # a sample, said as such, and nothing about training (cvae-sample and cvae-eval load it too)
    assert (
        "using the bundled MNIST sample instead: 10,000 of MNIST's 60,000 training digits and 2,000 of its 10,000 test"
        in (warnings[0].getMessage())
        and "training on" not in warnings[0].getMessage()
    )
    with pytest.raises(UserError, match="data.path="):
        sources.load("fashion_mnist")


def test_closed_network_is_detected_fast(caplog):
    """The real thing, without mocks: skipped where the Hub answers. The probe gives up after its own
    timeout (a wall-clock wait, so a loaded machine does not stretch it) instead of datasets' ~20 s of
    retries; then the bundled sample is used, with the warning that names data.path."""
    start = time.perf_counter()
    reachable = sources._hub_reachable()
    waited = time.perf_counter() - start
    if reachable:
        pytest.skip("the Hugging Face Hub is reachable here")
    assert waited < sources._HUB_PROBE_TIMEOUT_S + 2
    with caplog.at_level(logging.WARNING, logger=sources.__name__):
        data = sources.load("mnist")
    _assert_bundled(data)
    assert "data.path=" in caplog.text


def test_hub_dataset_is_decoded_and_cached(tiny_parquet, monkeypatch):
    """Online, and offline with a copy in datasets' own cache: both read the Hub dataset, not the sample."""
    root, splits = tiny_parquet
    real_load_dataset = datasets.load_dataset
    offline_flags = []

    def hub(path, *args, **kwargs):
        assert path == "someone/digits"
        offline_flags.append(datasets.config.HF_HUB_OFFLINE)
        return real_load_dataset(str(root), *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: True)
    data = sources.load(hub="someone/digits")
    _assert_equal(data, splits)
    assert data.source == "hub:someone/digits"

    monkeypatch.setattr(sources, "_hub_reachable", lambda: False)
    monkeypatch.setattr(sources, "_decode", lambda *a: pytest.fail("decoded again despite the cache"))
    _assert_equal(sources.load(hub="someone/digits"), splits)
    assert offline_flags == [False, True] and datasets.config.HF_HUB_OFFLINE is False


def test_unknown_name_is_refused():
    with pytest.raises(UserError, match="data.name=cifar"):
        sources.load("cifar")


@needs_shared
def test_full_mnist_parquet_and_idx_agree():
    hf, idx = sources.load(path=str(SHARED / "hf")), sources.load(path=str(SHARED / "idx"))
    assert hf.train_images.shape == (60_000, 28, 28, 1) and hf.test_images.shape == (10_000, 28, 28, 1)
    assert hf.geometry == idx.geometry == MNIST
    for key in sources.IDX_NAMES:
        np.testing.assert_array_equal(getattr(hf, key), getattr(idx, key))


@needs_shared
def test_bundled_sample_is_the_head_of_full_mnist():
    sample, full = sources.load(path=str(sources.BUNDLED)), sources.load(path=str(SHARED / "idx"))
    for key in sources.IDX_NAMES:
        head = 10_000 if key.startswith("train") else 2_000
        np.testing.assert_array_equal(getattr(sample, key), getattr(full, key)[:head])
