"""Raw images from the Hugging Face Hub, a local folder, or the MNIST sample bundled with the package.

Sources: a Parquet folder in the Hub's layout, an image folder in the `imagefolder` layout of `datasets`
(one sub-folder per class, optional train/ and test/), a folder of the four MNIST IDX files, a Hub dataset by
name. Everything ends as plain uint8/int32 numpy arrays with the geometry read off them (`RawData`), decoded
once: PNG decoding is far too slow to repeat per training step, so decoded arrays are also cached as an `.npz`
keyed by a fingerprint of the source. A source without a test split gets one carved from its training images.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import logging
import math
import os
import struct
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cvae_exp.data.decode import Columns, class_count, decode_dataset, first_line, open_image, pick_columns
from cvae_exp.data.geometry import Geometry, numbered
from cvae_exp.errors import UserError, storage_error

DATASETS = {"mnist": "ylecun/mnist", "fashion_mnist": "zalando-datasets/fashion_mnist"}
BUNDLED = Path(__file__).resolve().parent / "bundled"
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_TABLE_SUFFIXES = {".parquet", ".arrow"}  # a folder of these is read as the Hub's layout
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}  # a folder of these (no tables) as an imagefolder
_CACHE_FORMAT = 2  # 2: images [N, H, W, C] and the geometry beside them
TEST_SHARE = 10  # a source without a test split: one image in TEST_SHARE held out as its test split
_HUB_PROBE_TIMEOUT_S = 3.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawData:
    """Decoded images uint8 [N, H, W, C] and labels int32 [N] (zeros where the data has no classes), their
    geometry, and where they came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    geometry: Geometry
    sha256: str = ""  # of the arrays' contents (content_sha256): what identifies the data, wherever it lies


def _arrays(data: RawData) -> dict[str, np.ndarray]:
    return {k: getattr(data, k) for k in IDX_NAMES}


def content_sha256(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of the four arrays' contents (dtype, shape and bytes, in IDX_NAMES order): equal digests, equal
    images and labels, however they are stored. About 0.1 s for the full MNIST; cached beside the decoded arrays."""
    digest = hashlib.sha256()
    for key in IDX_NAMES:
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        digest.update(a.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _with_digest(data: RawData) -> RawData:
    return data if data.sha256 else replace(data, sha256=content_sha256(_arrays(data)))


def _idx_files(root: Path) -> dict[str, Path | None]:
    """The four canonical IDX files in `root` (gzipped preferred), None where one is missing."""
    found = ((key, [root / (stem + ".gz"), root / stem]) for key, stem in IDX_NAMES.items())
    return {key: next((f for f in files if f.is_file()), None) for key, files in found}


def check_path(path: str | None, columns: Columns | None = None, needs_labels: bool = False) -> None:
    """Fail in milliseconds on a bad data.path, before anything slow (imports, JIT, decoding) has run.

    Accepted: a folder with the four MNIST IDX files (gzipped or not), or with files datasets.load_dataset can
    read as an image dataset (Parquet in the Hub layout, Arrow, an imagefolder of PNG/JPEG). A Parquet table's
    columns are checked from its footer: the image column, and the label column when `needs_labels`.
    """
    if path is None:
        return
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"data.path={path} does not exist.")
    if not root.is_dir():
        raise UserError(f"data.path={path} is not a directory; point it at a folder of Parquet or IDX files.")
    idx = _idx_files(root)
    if all(idx.values()):
        return
    files = [f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in _TABLE_SUFFIXES | _IMAGE_SUFFIXES]
    if files:
        parquet = [f for f in sorted(files) if f.suffix.lower() == ".parquet"]
        _check_parquet(path, parquet, columns or Columns(), needs_labels)
        return
    if any(idx.values()):
        missing = ", ".join(IDX_NAMES[k] + "[.gz]" for k, f in idx.items() if f is None)
        raise UserError(f"data.path={path} holds only part of the MNIST IDX files: {missing} is missing.")
    raise UserError(
        f"data.path={path} holds neither Parquet files (Hub layout), nor PNG or JPEG images, nor the four MNIST IDX files."
    )


def _parquet_types(schema) -> dict[str, str]:
    """{column: feature type} from a Parquet footer: the `datasets` features that its writer recorded there
    ("Image", "ClassLabel", ...), "Value" for the other columns."""
    try:
        features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}")).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        features = {}
    return {name: (features.get(name) or {}).get("_type", "Value") for name in schema.names}


def _check_parquet(path: str, files: list[Path], columns: Columns, needs_labels: bool) -> None:
    """Each Parquet file's columns (from its footer) and first image: a folder of the wrong data, or a file
    that is not Parquet at all, is refused before anything is loaded or decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in files:
        try:
            schema = pq.read_schema(file)
            image, _ = pick_columns(_parquet_types(schema), f"data.path={path}", file.name, columns, needs_labels)
            first = next(pq.ParquetFile(file).iter_batches(batch_size=1, columns=[image]), None)
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"data.path={path}: {file} is not a readable Parquet file ({first_line(err)}).") from None
        cell = first.column(0)[0].as_py() if first is not None and first.num_rows else None
        if isinstance(cell, dict) and cell.get("bytes"):  # the Hub's Image feature: encoded bytes
            open_image(cell, lambda file=file: f"data.path={path}: row 0 of {file}")


def read_idx(file: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (plain or gzipped) of unsigned bytes; the format is tiny, so no dependency is needed."""
    path = Path(file)
    try:
        raw = path.read_bytes()
    except OSError as e:  # the file system refused it (permissions, I/O error): exit 74, not a data error
        raise (storage_error(e) or UserError(f"{path} could not be read: {e}.")) from e
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # gzip's BadGzipFile is an OSError: the bytes are bad
        raise UserError(f"{path} could not be read as a (gzipped) IDX file: {e}.") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] == 0:
        raise UserError(f"{path} is not an IDX file of unsigned bytes (magic number {raw[:4].hex() or 'missing'}).")
    header = 4 + 4 * raw[3]
    dims = struct.unpack(f">{raw[3]}I", raw[4:header]) if len(raw) >= header else ()
    if not dims or len(raw) != header + math.prod(dims):
        raise UserError(f"{path} is truncated or corrupt: its size does not match the shape in its header.")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def _checked(where: str, source: str, arrays: dict[str, np.ndarray]) -> RawData:
    """IDX arrays as RawData: images [N, H, W] (or [N, H, W, C], C 1 or 3) of one size in both splits, labels
    checked in their own integer type and only then cast to int32 (a cast first would wrap 2**40 to 0)."""
    images = {}
    for split in ("train", "test"):
        x = arrays[f"{split}_images"]
        if len(x) == 0:  # an empty test split would train the whole run, then fail at its final evaluation
            raise UserError(f"{where} holds no {split} images.")
        x = x[..., None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            size = "x".join(map(str, x.shape[1:]))
            raise UserError(
                f"{where} holds {split} images of shape {size}; images are height x width (x 1 or 3 channels)."
            )
        if (labels := arrays[f"{split}_labels"]).shape != x.shape[:1]:
            raise UserError(f"{where} has {labels.size} {split} labels for {len(x)} {split} images.")
        images[split] = x
    if images["train"].shape[1:] != images["test"].shape[1:]:
        sizes = ", ".join(f"{s} {'x'.join(map(str, x.shape[1:]))}" for s, x in images.items())
        raise UserError(f"{where} holds images of different sizes ({sizes}, height x width x channels).")
    labels = {split: arrays[f"{split}_labels"] for split in ("train", "test")}
    classes = class_count(labels, None, where, None)
    height, width, channels = images["train"].shape[1:]
    geometry = Geometry(height, width, channels, classes, numbered(classes))
    return _with_digest(
        RawData(
            images["train"],
            labels["train"].astype(np.int32),
            images["test"],
            labels["test"].astype(np.int32),
            source,
            geometry,
        )
    )


def _load_idx(root: Path, where: str) -> RawData:
    arrays = {key: read_idx(file) for key, file in _idx_files(root).items()}
    return _checked(where, f"idx:{root}", arrays)


def _data_files(root: Path | None) -> Callable[[str], list[Path]]:
    """The files `datasets.load_dataset(root)` reads for each split, in its order (looked up only when a row
    must be named); none for a Hub dataset."""

    @functools.cache
    def files(split: str) -> list[Path]:
        if root is None:
            return []
        import datasets

        try:
            data_files = datasets.load_dataset_builder(str(root)).config.data_files or {}
            return [Path(f) for f in data_files.get(split, [])]
        except Exception:  # naming the file is a courtesy; the row is still named
            return []

    return files


def _decode(dd, where: str, source: str, columns: Columns, root: Path | None = None) -> RawData:
    """A DatasetDict decoded (cvae_exp.data.decode); without a test split, one is carved from train."""
    arrays = decode_dataset(dd, where, columns, _data_files(root))
    if "test_images" not in arrays:
        arrays, source = _carve_test(arrays, where, source)
    return RawData(**{k: arrays[k] for k in IDX_NAMES}, source=source, geometry=arrays["geometry"])


def _carve_test(arrays: dict, where: str, source: str) -> tuple[dict, str]:
    """A test split for a source that has none: one training image in TEST_SHARE (at least one), the same
    ones every time (a fixed permutation, whatever the run's seeds), so every run on it scores the same images."""
    n = len(arrays["train_images"])
    n_test = max(1, n // TEST_SHARE)
    order = np.random.default_rng(0).permutation(n)
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    log.info("%s has no test split: %d of its %d training images are held out as the test split.", where, n_test, n)
    carved = {
        **arrays,
        "train_images": arrays["train_images"][train],
        "train_labels": arrays["train_labels"][train],
        "test_images": arrays["train_images"][test],
        "test_labels": arrays["train_labels"][test],
    }
    return carved, f"{source} (test split carved from train: {n_test} of {n})"


def _cached(cache_dir: str | None, fingerprint: tuple, source: str, decode: Callable[[], RawData]) -> RawData:
    """Return the arrays cached under `fingerprint`, or decode and cache them; a corrupt cache is rewritten."""
    root = Path(cache_dir or os.environ.get("CVAE_EXP_CACHE") or Path.home() / ".cache" / "cvae_exp").expanduser()
    key = (_CACHE_FORMAT, *fingerprint)
    file = root / f"raw-{hashlib.sha256(repr(key).encode()).hexdigest()[:24]}.npz"
    try:
        with np.load(file, allow_pickle=False) as z:
            record = json.loads(str(z["record"]))
            return _with_digest(
                RawData(
                    **{k: z[k] for k in IDX_NAMES},
                    source=record["source"],
                    geometry=Geometry.from_record(record["geometry"]),
                    sha256=record.get("sha256", ""),  # a cache from before the digest: computed now
                )
            )
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.info("Ignoring unreadable cache file %s (%s); decoding again.", file, e)
    data = _with_digest(decode())
    record = json.dumps({"source": data.source, "geometry": data.geometry.record(), "sha256": data.sha256})
    try:  # atomic (temp file + rename): a killed run or a parallel sweep never leaves a half-written cache
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, suffix=".tmp", delete=False) as tmp:
            np.savez(tmp, **_arrays(data), record=np.array(record))
        os.replace(tmp.name, file)
    except OSError as e:
        log.warning("Could not write the data cache %s (%s); the next run will decode again.", file, e)
    return data


def _load_folder(root: Path, where: str, cache_dir: str | None, columns: Columns) -> RawData:
    """A Parquet (Hub layout) folder or an image folder via datasets, cached by file sizes and mtimes so a hit
    skips datasets."""
    tables = any(f.suffix.lower() in _TABLE_SUFFIXES for f in root.rglob("*") if f.is_file())
    source = f"{'parquet' if tables else 'imagefolder'}:{root}"

    def decode() -> RawData:
        import datasets  # only on a cache miss: importing it costs about a second

        try:
            dd = (
                datasets.load_dataset(str(root)) if tables else datasets.load_dataset("imagefolder", data_dir=str(root))
            )
        except Exception as e:  # whatever datasets fails on, the folder is not a dataset we can read,
            if storage_error(e) is not None:  # unless the file system refused its cache (a full disk): exit 74
                raise storage_error(e) from e
            raise UserError(f"{where} could not be read by datasets.load_dataset ({first_line(e)}).") from e
        return _decode(dd, where, source, columns, root)

    stats = [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(root.rglob("*"))]
    return _cached(cache_dir, ("folder", str(root), stats, columns.fingerprint()), source, decode)


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD request in a daemon thread, bounded even when DNS hangs.

    Without it, datasets retries a closed network for about 20 s before giving up.
    """
    import datasets
    from huggingface_hub.utils import get_session

    done, answered = threading.Event(), threading.Event()

    def probe() -> None:
        with contextlib.suppress(Exception):  # offline mode, DNS, refused, TLS, timeout: all mean "unreachable"
            get_session().head(datasets.config.HF_ENDPOINT, timeout=timeout)  # any HTTP status will do
            answered.set()
        done.set()

    threading.Thread(target=probe, daemon=True).start()
    return done.wait(timeout) and answered.is_set()


@contextlib.contextmanager
def _datasets_offline() -> Iterator[None]:
    """datasets reads HF_HUB_OFFLINE once at import; flipping its flag makes it use its cache without retries."""
    import datasets

    before, datasets.config.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


def _load_hub(hub: str, where: str, cache_dir: str | None, columns: Columns) -> RawData:
    """Raises ConnectionError when the Hub is unreachable and datasets has no cached copy either."""
    import datasets

    online = not datasets.config.HF_HUB_OFFLINE and _hub_reachable()
    try:
        with contextlib.nullcontext() if online else _datasets_offline():
            dd = datasets.load_dataset(hub)
    except datasets.exceptions.DatasetNotFoundError as e:
        raise UserError(f"{where} was not found on the Hugging Face Hub.") from e
    source = f"hub:{hub}"
    arrow_files = [f["filename"] for split in dd.values() for f in split.cache_files]  # name the revision
    key = ("hub", hub, arrow_files, columns.fingerprint())
    return _cached(cache_dir, key, source, lambda: _decode(dd, where, source, columns))


def load(
    name: str = "mnist",
    path: str | None = None,
    hub: str | None = None,
    cache_dir: str | None = None,
    columns: Columns | None = None,
    checked: bool = False,
) -> RawData:
    """Load train/test images from `path` (a Parquet, image or IDX folder), else from the Hub (`hub`, or the
    dataset `name` stands for), else the bundled MNIST sample; `columns` says how to read a table. `checked`:
    the caller's pre-flight has checked the path already (cvae_exp.config.check_data_path).

    The bundled MNIST sample only stands in for an unreachable Hub, announced by one logged warning.
    """
    columns = columns or Columns()
    if not checked:
        check_path(path, columns)
    if path is not None:
        root = Path(path).expanduser().resolve()
        if all(_idx_files(root).values()):
            if columns != Columns():
                raise UserError(
                    f"data.path={path} holds IDX files, arrays without columns to name or images to resize: unset "
                    "data.image_column, data.label_column and data.resize."
                )
            return _load_idx(root, f"data.path={path}")
        return _load_folder(root, f"data.path={path}", cache_dir, columns)
    if hub is None and name not in DATASETS:
        raise UserError(f"data.name={name} is unknown; use one of {', '.join(DATASETS)}, or set data.path or data.hub.")
    repo = hub or DATASETS[name]
    try:
        return _load_hub(repo, f"data.hub={hub}" if hub else f"data.name={name} ({repo})", cache_dir, columns)
    except ConnectionError as e:
        if repo != DATASETS["mnist"]:
            raise UserError(f"The Hugging Face Hub could not be reached for {repo}; set data.path=<local copy>.") from e
    sample = _load_folder(BUNDLED, "the bundled MNIST sample", cache_dir, columns)
    n_train, n_test = len(sample.train_labels), len(sample.test_labels)
    # Said the same way by every command that loads it (cvae-eval and cvae-sample too: none "trains" there).
    log.warning(
        "The Hugging Face Hub could not be reached; using the bundled MNIST sample instead: %s of MNIST's 60,000 "
        "training digits and %s of its 10,000 test digits, so its numbers are not those of the full dataset. "
        "Set data.path=<folder> to use a local copy of the full dataset.",
        f"{n_train:,}",
        f"{n_test:,}",
    )
    return replace(sample, source=f"bundled sample ({n_train} train / {n_test} test)")
