"""Raw 28x28 digit images from the Hugging Face Hub, a local folder, or the sample bundled with the package.

Everything ends as plain uint8/int32 numpy arrays (`RawData`), decoded once: PNG decoding is far too slow to
repeat per training step, so decoded arrays are also cached as an `.npz` keyed by a fingerprint of the source.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import logging
import math
import os
import struct
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cvae_exp.errors import UserError, storage_error

DATASETS = {"mnist": "ylecun/mnist", "fashion_mnist": "zalando-datasets/fashion_mnist"}
BUNDLED = Path(__file__).resolve().parent / "bundled"
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_DATA_SUFFIXES = {".parquet", ".arrow", ".png", ".jpg", ".jpeg"}  # files load_dataset makes an image dataset of
_SIDE = 28
_NUM_CLASSES = 10
_HUB_PROBE_TIMEOUT_S = 3.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawData:
    """Decoded digits: images uint8 [N, 28, 28], labels int32 [N] in 0..9, and where they came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    sha256: str = ""  # of the arrays' contents (content_sha256): what identifies the data, wherever it lies


def _arrays(data: RawData) -> dict[str, np.ndarray]:
    return {k: getattr(data, k) for k in IDX_NAMES}


def content_sha256(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of the four arrays' contents (dtype, shape and bytes, in IDX_NAMES order): equal digests, equal
    digits and labels, however they are stored. About 0.1 s for the full MNIST; cached beside the decoded arrays."""
    digest = hashlib.sha256()
    for key in IDX_NAMES:
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        digest.update(a.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _idx_files(root: Path) -> dict[str, Path | None]:
    """The four canonical IDX files in `root` (gzipped preferred), None where one is missing."""
    found = ((key, [root / (stem + ".gz"), root / stem]) for key, stem in IDX_NAMES.items())
    return {key: next((f for f in files if f.is_file()), None) for key, files in found}


def check_path(path: str | None) -> None:
    """Fail in milliseconds on a bad data.path, before anything slow (imports, JIT, decoding) has run.

    Accepted: a folder with the four MNIST IDX files (gzipped or not), or with files datasets.load_dataset can
    read as an image dataset (Parquet in the Hub layout, Arrow, an imagefolder of PNG/JPEG).
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
    files = [f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in _DATA_SUFFIXES]
    if files:
        _check_parquet(path, [f for f in sorted(files) if f.suffix.lower() == ".parquet"])
        return
    if any(idx.values()):
        missing = ", ".join(IDX_NAMES[k] + "[.gz]" for k, f in idx.items() if f is None)
        raise UserError(f"data.path={path} holds only part of the MNIST IDX files: {missing} is missing.")
    raise UserError(f"data.path={path} holds neither Parquet files (Hub layout) nor the four MNIST IDX files.")


def _check_parquet(path: str, files: list[Path]) -> None:
    """Each Parquet file's columns (from its footer) and first image: a folder of the wrong data, or a file
    that is not Parquet at all, is refused before anything is loaded or decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in files:
        try:
            names = pq.read_schema(file).names
            if missing := [c for c in ("image", "label") if c not in names]:
                raise UserError(f"data.path={path} has no {' or '.join(map(repr, missing))} column in {file.name}.")
            first = next(pq.ParquetFile(file).iter_batches(batch_size=1, columns=["image"]), None)
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"data.path={path}: {file} is not a readable Parquet file ({_first_line(err)}).") from None
        cell = first.column(0)[0].as_py() if first is not None and first.num_rows else None
        if isinstance(cell, dict) and cell.get("bytes"):  # the Hub's Image feature: encoded bytes
            width, height = _open_image(cell, lambda file=file: f"data.path={path}: row 0 of {file}").size
            if (width, height) != (_SIDE, _SIDE):
                raise UserError(
                    f"data.path={path} holds {width}x{height} images ({file.name}); "
                    f"this model needs {_SIDE}x{_SIDE} grayscale digits."
                )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def _open_image(cell: dict, where: Callable[[], str]) -> Image.Image:
    """One image cell of the Hub's Image feature, decoded; undecodable bytes are refused naming `where()`, which
    is only worked out then (naming a row opens its Parquet file's metadata: far too slow for every row)."""
    try:
        image = Image.open(io.BytesIO(cell["bytes"]) if cell["bytes"] is not None else cell["path"])
        image.load()
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for broken bytes
        raise UserError(f"{where()} is not a decodable image ({_first_line(err)}).") from None
    return image


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
    """One place for the invariants the model relies on, whatever the source; labels are checked in their
    own integer type and only then cast to int32 (a cast first would wrap 2**40 to 0)."""
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) == 0:  # an empty test split would train the whole run, then fail at its final evaluation
            raise UserError(f"{where} holds no {split} images.")
        if images.ndim != 3 or images.shape[1:] != (_SIDE, _SIDE):
            size = "x".join(map(str, images.shape[1:]))
            raise UserError(f"{where} holds {size} images; this model needs {_SIDE}x{_SIDE} grayscale digits.")
        if labels.shape != images.shape[:1]:
            raise UserError(f"{where} has {labels.size} {split} labels for {len(images)} {split} images.")
        _check_labels(labels, f"{where} has", split)
        arrays[f"{split}_labels"] = labels.astype(np.int32)
    return RawData(**{k: arrays[k] for k in IDX_NAMES}, source=source, sha256=content_sha256(arrays))


def _check_labels(labels: np.ndarray, where: str, split: str, rows: Callable[[int], str] | None = None) -> None:
    if labels.dtype.kind not in "iu":
        raise UserError(f"{where} {split} labels of type {labels.dtype}, not integers 0..{_NUM_CLASSES - 1}.")
    bad = np.flatnonzero((labels < 0) | (labels >= _NUM_CLASSES))
    if bad.size:
        at = rows(int(bad[0])) if rows else f"row {bad[0]} of the {split} split"
        more = f" ({bad.size} such labels)" if bad.size > 1 else ""
        raise UserError(f"{where} a {split} label {labels[bad[0]]} at {at}, outside 0..{_NUM_CLASSES - 1}{more}.")


def _load_idx(root: Path, where: str) -> RawData:
    arrays = {key: read_idx(file) for key, file in _idx_files(root).items()}
    return _checked(where, f"idx:{root}", arrays)


def _decode_split(dd, where: str, split: str, files: Callable[[str], list[Path]]) -> dict[str, np.ndarray]:
    """Decode a split's PNG bytes with PIL in one pass (about twice as fast as datasets' numpy formatting).
    An undecodable image or a label outside 0..9 is refused naming the row (and its file, `files(split)`)."""
    import datasets

    if split not in dd:
        raise UserError(f"{where} has no {split!r} split (found: {', '.join(dd) or 'none'}).")
    ds = dd[split]
    if missing := [c for c in ("image", "label") if c not in ds.column_names]:
        raise UserError(f"{where} has no {' or '.join(map(repr, missing))} column in its {split} split.")
    if not isinstance(ds.features["image"], datasets.Image):
        raise UserError(f"{where} stores {split} 'image' as {type(ds.features['image']).__name__}, not as images.")

    def row(i: int) -> str:
        return _row_in_files(i, split, files(split))

    cells = ds.cast_column("image", datasets.Image(decode=False)).with_format("arrow")["image"].to_pylist()
    images = np.empty((len(cells), _SIDE, _SIDE), np.uint8)
    for i, cell in enumerate(cells):
        image = _open_image(cell, lambda i=i: f"{where}: {row(i)}")
        if image.size != (_SIDE, _SIDE) or image.mode != "L":
            size = f"{image.size[0]}x{image.size[1]} {image.mode}"
            raise UserError(f"{where} holds {size} images; this model needs {_SIDE}x{_SIDE} grayscale (L) digits.")
        images[i] = np.asarray(image)
    labels = np.asarray(ds.with_format("arrow")["label"])  # as stored: checked before any cast
    _check_labels(labels, f"{where} has", split, row)
    return {f"{split}_images": images, f"{split}_labels": labels}


def _row_in_files(i: int, split: str, files: list[Path]) -> str:
    """Where row `i` of a split comes from: 'row 17 of <file>' when the split's Parquet files are known."""
    import pyarrow.parquet as pq

    start = 0
    for file in files:
        if file.suffix.lower() != ".parquet":
            break
        n = pq.ParquetFile(file).metadata.num_rows
        if i < start + n:
            return f"row {i - start} of {file}"
        start += n
    return f"row {i} of the {split} split"


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


def _decode(dd, where: str, source: str, root: Path | None = None) -> RawData:
    files = _data_files(root)
    return _checked(
        where, source, {**_decode_split(dd, where, "train", files), **_decode_split(dd, where, "test", files)}
    )


_SHA256_KEY = "content_sha256"  # the digest's entry in a cache file


def _cached(cache_dir: str | None, fingerprint: tuple, source: str, decode: Callable[[], RawData]) -> RawData:
    """Return the arrays cached under `fingerprint`, or decode and cache them; a corrupt cache is rewritten."""
    root = Path(cache_dir or os.environ.get("CVAE_EXP_CACHE") or Path.home() / ".cache" / "cvae_exp").expanduser()
    file = root / f"raw-{hashlib.sha256(repr(fingerprint).encode()).hexdigest()[:24]}.npz"
    data = None
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in IDX_NAMES}
            if _SHA256_KEY in z.files:
                return RawData(**arrays, source=source, sha256=str(z[_SHA256_KEY]))
        data = RawData(**arrays, source=source, sha256=content_sha256(arrays))  # a cache from before the digest
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.info("Ignoring unreadable cache file %s (%s); decoding again.", file, e)
    data = data or decode()
    try:  # atomic (temp file + rename): a killed run or a parallel sweep never leaves a half-written cache
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, suffix=".tmp", delete=False) as tmp:
            np.savez(tmp, **_arrays(data), **{_SHA256_KEY: np.array(data.sha256)})
        os.replace(tmp.name, file)
    except OSError as e:
        log.warning("Could not write the data cache %s (%s); the next run will decode again.", file, e)
    return data


def _load_folder(root: Path, where: str, source: str, cache_dir: str | None) -> RawData:
    """A Parquet (Hub layout) folder via datasets, cached by file sizes and mtimes so a hit skips datasets."""

    def decode() -> RawData:
        import datasets  # only on a cache miss: importing it costs about a second

        try:
            dd = datasets.load_dataset(str(root))
        except Exception as e:  # whatever datasets fails on, the folder is not a dataset we can read,
            if storage_error(e) is not None:  # unless the file system refused its cache (a full disk): exit 74
                raise storage_error(e) from e
            raise UserError(f"{where} could not be read by datasets.load_dataset ({_first_line(e)}).") from e
        return _decode(dd, where, source, root)

    stats = [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(root.rglob("*"))]
    return _cached(cache_dir, ("folder", str(root), stats), source, decode)


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


def _load_hub(hub_id: str, where: str, cache_dir: str | None) -> RawData:
    """Raises ConnectionError when the Hub is unreachable and datasets has no cached copy either."""
    import datasets

    online = not datasets.config.HF_HUB_OFFLINE and _hub_reachable()
    try:
        with contextlib.nullcontext() if online else _datasets_offline():
            dd = datasets.load_dataset(hub_id)
    except datasets.exceptions.DatasetNotFoundError as e:
        raise UserError(f"{where} was not found on the Hugging Face Hub.") from e
    source = f"hub:{hub_id}"
    arrow_files = [f["filename"] for split in dd.values() for f in split.cache_files]  # name the revision
    return _cached(cache_dir, ("hub", hub_id, arrow_files), source, lambda: _decode(dd, where, source))


def load(
    name: str = "mnist", path: str | None = None, hub_id: str | None = None, cache_dir: str | None = None
) -> RawData:
    """Load train/test digits from `path` (Parquet or IDX folder), else from the Hub, else the bundled sample.

    The bundled MNIST sample only stands in for an unreachable Hub, announced by one logged warning.
    """
    check_path(path)
    if path is not None:
        root = Path(path).expanduser().resolve()
        if all(_idx_files(root).values()):
            return _load_idx(root, f"data.path={path}")
        return _load_folder(root, f"data.path={path}", f"parquet:{root}", cache_dir)
    if hub_id is None and name not in DATASETS:
        raise UserError(f"data.name={name} is unknown; use one of {', '.join(DATASETS)} or set data.path.")
    repo = hub_id or DATASETS[name]
    try:
        return _load_hub(repo, f"data.hub_id={hub_id}" if hub_id else f"data.name={name} ({repo})", cache_dir)
    except ConnectionError as e:
        if repo != DATASETS["mnist"]:
            raise UserError(f"The Hugging Face Hub could not be reached for {repo}; set data.path=<local copy>.") from e
    sample = _load_folder(BUNDLED, "the bundled MNIST sample", "bundled sample", cache_dir)
    n_train, n_test = len(sample.train_labels), len(sample.test_labels)
    # Said the same way by every command that loads it (cvae-eval and cvae-sample too: none "trains" there).
    log.warning(
        "The Hugging Face Hub could not be reached; using the bundled MNIST sample instead: %s of MNIST's 60,000 "
        "training digits and %s of its 10,000 test digits, so its numbers are not those of the full dataset. "
        "Set data.path=<folder> to use a local copy of the full dataset.",
        f"{n_train:,}",
        f"{n_test:,}",
    )
    return RawData(**_arrays(sample), source=f"bundled sample ({n_train} train / {n_test} test)", sha256=sample.sha256)
