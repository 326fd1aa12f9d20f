"""Strict readers for on-disk dataset formats: IDX (MNIST family) and CIFAR pickle batches
(npz: npz_format.py).

Every reader either returns arrays that meet its contract (uint8 or finite float32 images with
no empty dimension, int64 labels in range, as many labels as images) or raises DataError with a
one-line reason; sizes a header claims are checked before anything that size is allocated.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from codream_secure.errors import DataError

try:  # numpy >= 1.26 exposes numpy._core; older releases only numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - old numpy
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_UBYTE = 0x08
_CHUNK = 1 << 20
MAX_FILE_BYTES = 1 << 34  # 16 GiB of (decompressed) data per file: far above CIFAR or MNIST
MAX_IMAGE_SIDE = 8192  # pixels per image side; a larger IDX header is damage, not data
MAX_CLASSES = 100_000  # labels are class indices; a label of 2e8 would mean a 2e8-unit output layer


def read_bytes(path: Path, *, limit: int = MAX_FILE_BYTES, prefix: bool = False) -> bytes:
    """Read a file, transparently gunzipping it (by content, not by name), in chunks.

    More than `limit` bytes raise DataError before they are held, unless `prefix`: then the
    first `limit` bytes come back (an IDX header, read before its body is).
    """
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        gzipped = handle.read(2) == _GZIP_MAGIC
        handle.seek(0)
        stream = gzip.GzipFile(fileobj=handle, mode="rb") if gzipped else handle
        chunks, held = [], 0
        try:
            while held <= limit:
                chunk = stream.read(min(_CHUNK, limit + 1 - held))
                if not chunk:
                    break
                chunks.append(chunk)
                held += len(chunk)
        except (OSError, EOFError, zlib.error) as exc:
            if gzipped:
                raise DataError(f"{path} is not a valid gzip file: {exc}") from None
            raise DataError(f"cannot read {path}: {exc}") from None
    data = b"".join(chunks)
    if prefix:
        return data[:limit]
    if len(data) > limit:
        raise DataError(f"{path} holds more than {limit:,} bytes{' once unzipped' * gzipped}, "
                        "more than this reader takes")
    return data


def _idx_dims(raw: bytes, *, ndim: int, where: str) -> tuple[int, ...]:
    """Check an IDX header (magic, type, rank, sane dimensions); its dimensions."""
    if len(raw) < 4:
        raise DataError(f"{where}: too short for an IDX header ({len(raw)} bytes)")
    zero, dtype_code, got_ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00":
        raise DataError(f"{where}: bad IDX magic number {raw[:4].hex()} (not an IDX file)")
    if dtype_code != _IDX_UBYTE:
        raise DataError(f"{where}: IDX data type 0x{dtype_code:02x} unsupported (need 0x08 ubyte)")
    if got_ndim != ndim:
        raise DataError(f"{where}: IDX file has {got_ndim} dimensions, expected {ndim}")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{where}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if 0 in dims:
        raise DataError(f"{where}: IDX header says {dims}: no "
                        f"{'images' if dims[0] == 0 else 'pixels'}")
    if any(side > MAX_IMAGE_SIDE for side in dims[1:]):
        raise DataError(f"{where}: IDX header says images of {dims[1:]} pixels, beyond "
                        f"{MAX_IMAGE_SIDE} per side: a damaged header")
    if math.prod(dims) > MAX_FILE_BYTES:  # Python ints: a hostile header cannot overflow
        raise DataError(f"{where}: IDX header says {dims} = {math.prod(dims):,} bytes, more "
                        f"than this reader takes ({MAX_FILE_BYTES:,})")
    return dims


def parse_idx(raw: bytes, *, ndim: int, where: str) -> np.ndarray:
    """Parse an unsigned-byte IDX blob with exactly `ndim` non-empty dimensions."""
    dims = _idx_dims(raw, ndim=ndim, where=where)
    header, size = 4 + 4 * ndim, math.prod(dims)
    if len(raw) - header != size:
        raise DataError(
            f"{where}: IDX header says {dims} = {size} bytes but the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Read an IDX file: its header first, then no more body than that header promises."""
    header = 4 + 4 * ndim
    dims = _idx_dims(read_bytes(path, limit=header, prefix=True), ndim=ndim, where=str(path))
    size = math.prod(dims)
    try:
        raw = read_bytes(path, limit=header + size)
    except DataError as exc:
        if "more than" not in str(exc):
            raise
        raise DataError(f"{path}: IDX header says {dims} = {size} bytes but the file holds "
                        "more") from None
    return parse_idx(raw, ndim=ndim, where=str(path))


def find_idx_file(folder: Path, stem: str) -> Path:
    """Locate an IDX file by stem, plain or gzipped, hyphen or dot spelling."""
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"missing {stem}[.gz] in {folder}")


def read_idx_split(folder: Path, prefix: str, *, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one (images, labels) pair such as train-* or t10k-* from `folder`."""
    img_path = find_idx_file(folder, f"{prefix}-images-idx3-ubyte")
    lab_path = find_idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(img_path, ndim=3)
    labels = read_idx(lab_path, ndim=1)
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lab_path} {len(labels)} labels")
    check_labels(labels, num_classes, where=str(lab_path))
    return images[:, None, :, :], labels.astype(np.int64)


class _NdarrayName:
    """numpy.ndarray as a pickle names it: the type argument of _reconstruct, never called,
    so a pickle cannot ask for a huge uninitialised array that it does not hold the bytes of."""

    def __call__(self, *args: object) -> None:
        raise DataError("pickle calls numpy.ndarray itself, which numpy's own pickles never do")


_NDARRAY = _NdarrayName()


def _reconstruct(subtype: object, shape: object, dtype: object) -> np.ndarray:
    """numpy's own pickles start every array empty, shape (0,), and fill it from their bytes."""
    if subtype is not _NDARRAY or shape != (0,):
        raise DataError(f"pickle builds an array as {shape!r}, not as numpy pickles do")
    return _multiarray._reconstruct(np.ndarray, (0,), dtype)


# Exactly what numpy's pickles of arrays need (protocols 2 to 5, numpy 1.x and 2.x module names,
# Python 2 pickles such as the real CIFAR files). No builtins: none is needed, and some (bytes,
# bytearray, range) would let a few bytes of pickle allocate gigabytes.
_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("_codecs", "encode"): __import__("codecs").encode,  # protocol-2 pickles of bytes from py3
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals, so a hostile file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise DataError(f"pickle refers to {module}.{name}, which is not allowed") from None


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one line of at most `limit` characters, for DataError messages."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_pickle(path: Path) -> Any:
    """Unpickle a dataset file with the restricted unpickler (bytes keys, as in CIFAR)."""
    raw = read_bytes(path)
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except Exception as exc:  # any malformed pickle is a data problem, not a crash
        raise DataError(f"{path} is not a readable pickle: {one_line(exc)}") from None


def _as_label_array(labels: object, where: str) -> np.ndarray:
    """Labels (a list or an array) as an array; any numpy complaint becomes DataError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return np.asarray(labels)
    except Exception as exc:
        raise DataError(f"{where}: labels are not an array: {one_line(exc)}") from None


def read_cifar_batch(
    path: Path, *, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch into uint8 N×3×32×32 images and int64 labels."""
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict batch, got {type(obj).__name__}")
    obj = {k.encode("utf-8", "surrogatepass") if isinstance(k, str) else k: v
           for k, v in obj.items()}
    if b"data" not in obj or label_key not in obj:
        keys = ", ".join(sorted(map(repr, obj)))
        raise DataError(f"{path}: batch lacks b'data' or {label_key!r} (keys: "
                        f"{keys if len(keys) < 200 else keys[:197] + '...'})")
    data, labels = obj[b"data"], obj[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: b'data' must be a 2-D uint8 array")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' rows have {data.shape[1]} values, expected 3072")
    if len(data) == 0:
        raise DataError(f"{path}: b'data' holds no images")
    labels = _as_label_array(labels, str(path))
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: {label_key!r} must be a flat list of integers")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    check_labels(labels, num_classes, where=str(path))
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def check_labels(labels: np.ndarray, num_classes: int, *, where: str) -> None:
    """Raise DataError unless every label lies in [0, num_classes)."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{where}: labels out of range [0, {num_classes}): "
            f"found {int(labels.min())}..{int(labels.max())}"
        )


_Split4 = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Path]


def _idx_folder(path: Path, subdirs: tuple[str, ...]) -> Path:
    """The first of `path`, `path/<subdir>` holding train images (torchvision layouts too)."""
    for folder in (path, *(path / s for s in subdirs)):
        for stem in ("train-images-idx3-ubyte", "train-images.idx3-ubyte"):
            if (folder / stem).is_file() or (folder / (stem + ".gz")).is_file():
                return folder
    return path


def _not_a_folder(path: Path) -> str:
    return " (it is a file; --data-dir takes the dataset's folder)" if path.exists() else ""


def read_idx_dataset(path: Path, *subdirs: str, hint: str = "") -> _Split4:
    """Read an MNIST-style folder (train-*, t10k-* IDX files) as uint8 N×1×H×W plus labels."""
    if not path.is_dir():
        raise DataError(f"dataset folder not found: {path}{_not_a_folder(path)}{hint}")
    folder = _idx_folder(path, subdirs)
    try:
        x_tr, y_tr = read_idx_split(folder, "train", num_classes=10)
        x_te, y_te = read_idx_split(folder, "t10k", num_classes=10)
    except DataError as exc:
        raise DataError(f"{exc}{hint}") from None
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{folder}: train images {x_tr.shape[1:]} but test images {x_te.shape[1:]}")
    return x_tr, y_tr, x_te, y_te, folder


def _read_cifar_files(folder: Path, files: list[str], label_key: bytes, k: int) -> tuple:
    xs, ys = [], []
    for f in files:
        if not (folder / f).is_file():
            raise DataError(f"missing {f} in {folder}")
        x, y = read_cifar_batch(folder / f, label_key=label_key, num_classes=k)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def read_cifar_dataset(path: Path, *, num_classes: int) -> _Split4:
    """Read CIFAR-10 or CIFAR-100 python files from `path` or its standard subfolder."""
    if num_classes == 10:
        train = [f"data_batch_{i}" for i in range(1, 6)]
        subdir, test, key = "cifar-10-batches-py", "test_batch", b"labels"
    elif num_classes == 100:
        subdir, train, test, key = "cifar-100-python", ["train"], "test", b"fine_labels"
    else:
        raise ValueError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    if not path.is_dir():
        raise DataError(f"dataset folder not found: {path}{_not_a_folder(path)}")
    folder = path / subdir if (path / subdir / test).is_file() else path
    x_tr, y_tr = _read_cifar_files(folder, train, key, num_classes)
    x_te, y_te = _read_cifar_files(folder, [test], key, num_classes)
    return x_tr, y_tr, x_te, y_te, folder
