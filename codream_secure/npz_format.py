"""The strict npz reader: x, y (and optionally x_test, y_test) arrays of images and labels."""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from codream_secure.errors import DataError
from codream_secure.formats import MAX_CLASSES, MAX_FILE_BYTES, one_line

__all__ = ["MAX_PIXEL", "read_npz"]

MAX_PIXEL = 1e6  # |float pixel| bound: keeps the float32 normalisation far from overflow


def _to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None, :, :]
    # Channels-last iff the last axis looks like channels and axis 1 does not; ties go to NCHW.
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def _images_to_float(x: object, where: str) -> np.ndarray:
    """uint8 (scaled to [0, 1]) or finite float images within ±MAX_PIXEL, as float32 NCHW."""
    if not isinstance(x, np.ndarray):
        raise DataError(f"{where}: not a .npy array member")
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise DataError(f"{where}: images must be uint8 or floating point, got {x.dtype}")
    if x.ndim not in (3, 4):
        raise DataError(f"{where}: images must be N×H×W, N×H×W×C or N×C×H×W, got shape {x.shape}")
    if 0 in x.shape:
        raise DataError(f"{where}: images of shape {x.shape}: "
                        f"{'no images' if len(x) == 0 else 'an empty dimension'}")
    if x.dtype == np.uint8:
        return _to_nchw(x.astype(np.float32) / np.float32(255.0), where)
    # checked in the file's own precision, so nothing overflows or warns in the cast
    if not np.isfinite(x).all():
        raise DataError(f"{where}: images contain NaN or infinity")
    peak = max(abs(float(x.min())), abs(float(x.max())))
    if peak > MAX_PIXEL:
        raise DataError(f"{where}: a pixel value of magnitude {peak:.3g} is beyond ±{MAX_PIXEL:g}"
                        " (beyond what float32 normalisation takes safely): rescale the images")
    return _to_nchw(x.astype(np.float32), where)


def _labels(y: object, n: int, where: str) -> np.ndarray:
    """A 1-D non-negative integer array with `n` entries (dtype unchanged: checked later)."""
    if not isinstance(y, np.ndarray):
        raise DataError(f"{where}: not a .npy array member")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) != n:
        raise DataError(f"{where}: {n} images but {len(y)} labels")
    if y.size and y.min() < 0:
        raise DataError(f"{where}: labels out of range: negative label {int(y.min())}")
    return y


def _npz_members(path: Path) -> dict[str, Any]:
    """The x, y, x_test, y_test members an npz holds (others are never loaded)."""
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a readable .npz file (not a zip archive)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a numpy complaint about the file is a bad file
            # our own handle: np.load leaves its own open when the archive is broken
            with path.open("rb") as handle, np.load(handle, allow_pickle=False) as npz:
                declared = sum(info.file_size for info in npz.zip.infolist())
                if declared > MAX_FILE_BYTES:  # zipfile reads no more than a member declares
                    raise DataError(f"{path}: its members unpack to {declared:,} bytes, more "
                                    f"than this reader takes ({MAX_FILE_BYTES:,})")
                return {k: npz[k] for k in ("x", "y", "x_test", "y_test") if k in npz.files}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path} is not a readable .npz file: {one_line(exc)}") from None


def _class_indices(path: Path, y: np.ndarray, y_test: np.ndarray | None) -> int:
    """K, the class count the labels imply; every class 0..K-1 must have a training example."""
    top = max(int(y.max()), -1 if y_test is None else int(y_test.max()))
    k = top + 1
    if k > MAX_CLASSES:  # every model's output layer has one unit per class
        present = len(np.unique(y)) if y_test is None else len(np.union1d(y, y_test))
        raise DataError(f"{path}: labels run up to {top}, i.e. {k:,} classes ({present:,} of "
                        f"them present); labels must be class indices 0..K-1 with K <= "
                        f"{MAX_CLASSES:,}: relabel them")
    if k < 2:
        raise DataError(f"{path}: every label is 0; a classifier needs at least 2 classes")
    empty = np.flatnonzero(np.bincount(y.astype(np.int64), minlength=k) == 0)
    if empty.size:
        raise DataError(f"{path}: labels run up to {top}, so there are {k} classes, but class "
                        f"{int(empty[0])} ({empty.size} in all) has no example in y: relabel "
                        "them 0..K-1 with every class present")
    return k


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Read x, y (and optional x_test, y_test) from an npz; images come back float32 NCHW,
    labels int64 in 0..K-1 with every class present in y."""
    if not path.is_file():
        raise DataError(f"npz file not found: {path}" + (" (it is a folder; --data-dir takes "
                        "the .npz file itself for --dataset npz)" if path.is_dir() else ""))
    arrays = _npz_members(path)
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {missing} (found {sorted(arrays)})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: x_test and y_test must be given together")
    x = _images_to_float(arrays["x"], f"{path}[x]")
    y = _labels(arrays["y"], len(x), f"{path}[y]")
    x_test = y_test = None
    if "x_test" in arrays:
        x_test = _images_to_float(arrays["x_test"], f"{path}[x_test]")
        y_test = _labels(arrays["y_test"], len(x_test), f"{path}[y_test]")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: x_test images {x_test.shape[1:]} differ from x "
                            f"{x.shape[1:]}")
    _class_indices(path, y, y_test)
    return (x, y.astype(np.int64), x_test,
            None if y_test is None else y_test.astype(np.int64))
