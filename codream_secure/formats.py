"""Strict readers for on-disk dataset formats: IDX (MNIST family), CIFAR pickle batches, npz."""

from __future__ import annotations

import gzip
import io
import math
import pickle
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


def read_bytes(path: Path) -> bytes:
    """Read a file, transparently gunzipping it (by content, not by name)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path} is not a valid gzip file: {exc}") from exc
    return raw


def parse_idx(raw: bytes, *, ndim: int, where: str) -> np.ndarray:
    """Parse an unsigned-byte IDX blob with exactly `ndim` dimensions."""
    if len(raw) < 4:
        raise DataError(f"{where}: too short for an IDX header ({len(raw)} bytes)")
    zero, dtype_code, got_ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00":
        raise DataError(f"{where}: bad IDX magic number {raw[:4].hex()} (not an IDX file)")
    if dtype_code != _IDX_UBYTE:
        raise DataError(f"{where}: IDX data type 0x{dtype_code:02x} unsupported (need 0x08 ubyte)")
    if got_ndim != ndim:
        raise DataError(f"{where}: IDX file has {got_ndim} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{where}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = math.prod(dims)  # Python ints: a hostile header cannot overflow
    if len(raw) - header != size:
        raise DataError(
            f"{where}: IDX header says {dims} = {size} bytes but the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


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
    images = parse_idx(read_bytes(img_path), ndim=3, where=str(img_path))
    labels = parse_idx(read_bytes(lab_path), ndim=1, where=str(lab_path))
    if len(images) != len(labels):
        raise DataError(f"{img_path} has {len(images)} images but {lab_path} {len(labels)} labels")
    check_labels(labels, num_classes, where=str(lab_path))
    return images[:, None, :, :], labels.astype(np.int64)


def _safe_builtins() -> dict[tuple[str, str], Any]:
    names = ("list", "dict", "tuple", "set", "frozenset", "bytearray", "bytes", "int", "float",
             "complex", "bool", "str", "slice", "range")  # fmt: skip
    import builtins

    out: dict[tuple[str, str], Any] = {}
    for n in names:
        out[("builtins", n)] = getattr(builtins, n)
        out[("__builtin__", n)] = getattr(builtins, n)  # Python 2 pickles (the real CIFAR files)
    return out


# Everything a pickled numpy array needs, under numpy 1.x and 2.x module names, plus harmless
# builtins. Notably absent: eval/exec/getattr/__import__, os, subprocess, functools, copyreg.
_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    **_safe_builtins(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
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


def load_pickle(path: Path) -> Any:
    """Unpickle a dataset file with the restricted unpickler (bytes keys, as in CIFAR)."""
    raw = read_bytes(path)
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except Exception as exc:  # any malformed pickle is a data problem, not a crash
        raise DataError(f"{path} is not a readable pickle: {type(exc).__name__}: {exc}") from None


def read_cifar_batch(
    path: Path, *, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch into uint8 N×3×32×32 images and int64 labels."""
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict batch, got {type(obj).__name__}")
    obj = {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}
    if b"data" not in obj or label_key not in obj:
        raise DataError(f"{path}: batch lacks b'data' or {label_key!r} (keys: {sorted(obj)})")
    data, labels = obj[b"data"], obj[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: b'data' must be a 2-D uint8 array")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' rows have {data.shape[1]} values, expected 3072")
    try:
        labels = np.asarray(labels)
    except Exception as exc:
        raise DataError(f"{path}: labels are not an array: {exc}") from None
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


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None, :, :]
    if x.ndim != 4:
        raise DataError(f"{where}: images must be N×H×W, N×H×W×C or N×C×H×W, got shape {x.shape}")
    # Channels-last iff the last axis looks like channels and axis 1 does not; ties go to NCHW.
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def _images_to_float(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == np.uint8:
        out = x.astype(np.float32) / np.float32(255.0)
    elif x.dtype.kind == "f":
        out = x.astype(np.float32)
        if not np.isfinite(out).all():
            raise DataError(f"{where}: images contain NaN or infinity")
    else:
        raise DataError(f"{where}: images must be uint8 or floating point, got {x.dtype}")
    return _to_nchw(out, where)


def _labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) != n:
        raise DataError(f"{where}: {n} images but {len(y)} labels")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: labels out of range: negative label {int(y.min())}")
    return y.astype(np.int64)


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Read x, y (and optional x_test, y_test) from an npz; images come back float32 NCHW."""
    if not path.is_file():
        raise DataError(f"npz file not found: {path}" + (" (it is a folder; --data-dir takes "
                        "the .npz file itself for --dataset npz)" if path.is_dir() else ""))
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise DataError(f"{path} is not a readable .npz file: {exc}") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {missing} (found {sorted(arrays)})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: x_test and y_test must be given together")
    x = _images_to_float(arrays["x"], f"{path}[x]")
    y = _labels(arrays["y"], len(x), f"{path}[y]")
    if "x_test" not in arrays:
        return x, y, None, None
    x_test = _images_to_float(arrays["x_test"], f"{path}[x_test]")
    y_test = _labels(arrays["y_test"], len(x_test), f"{path}[y_test]")
    if x_test.shape[1:] != x.shape[1:]:
        raise DataError(f"{path}: x_test images {x_test.shape[1:]} differ from x {x.shape[1:]}")
    return x, y, x_test, y_test


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
