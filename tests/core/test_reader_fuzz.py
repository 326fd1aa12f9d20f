"""Generated malformed files: valid IDX, CIFAR, npz and TOML files mutated (bit flips,
truncation, header fields, dtype swaps, NaN and extreme values, wrong types) by hypothesis.

Every read must either return arrays that meet the reader's contract or raise the typed error
(DataError, ConfigError) itself, not a subclass of ValueError or anything else, and no warning
may be emitted on the way. EXAMPLES below sets how many cases each test runs (3,100 in all).
"""

from __future__ import annotations

import gzip
import io
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codream_secure.config import KEY_SECTION, SECTIONS, build_config, load_config
from codream_secure.errors import ConfigError, DataError
from codream_secure.formats import MAX_CLASSES, read_cifar_batch, read_idx_split
from codream_secure.npz_format import MAX_PIXEL, read_npz

EXAMPLES = {"idx": 500, "cifar bytes": 500, "cifar fields": 400, "npz bytes": 400,
            "npz fields": 500, "toml": 800}
_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def _read_or_refuse(read: Callable[[], object], error: type[Exception]) -> object | None:
    """`read()`'s result, or None where it raised exactly `error`; never a warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = read()
        except error as exc:
            assert type(exc) is error, f"{type(exc).__name__}: {exc}"
            assert "\n" not in str(exc), str(exc)
            result = None
    assert not caught, [str(w.message) for w in caught]
    return result


# ----------------------------------------------------------------------------- byte mutations


@st.composite
def _mutated(draw: st.DrawFn, raw: bytes, fields: tuple[tuple[int, int], ...] = ()) -> bytes:
    """`raw` with bit flips, a header field overwritten, bytes inserted, or cut short."""
    data = bytearray(raw)
    kind = draw(st.sampled_from(["flip", "flip", "field", "cut", "insert"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif kind == "field" and fields:
        start, width = draw(st.sampled_from(fields))
        data[start:start + width] = draw(st.binary(min_size=width, max_size=width))
    elif kind == "cut":
        del data[draw(st.integers(0, len(data) - 1)):]
    else:
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


_RNG = np.random.default_rng(0)
IDX_IMAGES = _idx(_RNG.integers(0, 256, size=(6, 5, 4)))
IDX_LABELS = _idx(np.arange(6) % 10)
IDX_FIELDS = ((0, 4), (4, 4), (8, 4), (12, 4), (2, 1), (3, 1))  # magic, type, rank, dimensions


@settings(max_examples=EXAMPLES["idx"], **_SETTINGS)
@given(target=st.sampled_from(["images", "labels"]), gz=st.booleans(), data=st.data())
def test_mutated_idx_files(folder: Path, target: str, gz: bool, data: st.DataObject) -> None:
    files = {"images": IDX_IMAGES, "labels": IDX_LABELS}
    if gz:
        files = {name: gzip.compress(raw, mtime=0) for name, raw in files.items()}
    fields = () if gz else IDX_FIELDS
    files[target] = data.draw(_mutated(files[target], fields))
    for name, raw in files.items():
        (folder / f"train-{name}-idx{3 if name == 'images' else 1}-ubyte").write_bytes(raw)
    result = _read_or_refuse(lambda: read_idx_split(folder, "train", num_classes=10), DataError)
    if result is not None:
        x, y = result
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1] == 1 and 0 not in x.shape
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert y.min() >= 0 and y.max() < 10


def _cifar(n: int = 3) -> dict:
    return {b"batch_label": b"b", b"labels": [int(v) for v in _RNG.integers(0, 10, size=n)],
            b"data": _RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [b"f%d.png" % i for i in range(n)]}


CIFAR_PICKLES = [pickle.dumps(_cifar(), protocol=p) for p in (2, 5)]


def _check_cifar(path: Path) -> None:
    result = _read_or_refuse(lambda: read_cifar_batch(path, label_key=b"labels",
                                                       num_classes=10), DataError)
    if result is not None:
        x, y = result
        assert x.dtype == np.uint8 and x.shape[1:] == (3, 32, 32) and len(x) >= 1
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert y.min() >= 0 and y.max() < 10


@settings(max_examples=EXAMPLES["cifar bytes"], **_SETTINGS)
@given(protocol=st.sampled_from([0, 1]), data=st.data())
def test_mutated_cifar_pickle_bytes(folder: Path, protocol: int, data: st.DataObject) -> None:
    path = folder / "data_batch_1"
    path.write_bytes(data.draw(_mutated(CIFAR_PICKLES[protocol])))
    _check_cifar(path)


_ODD_VALUES = st.sampled_from([
    None, 3, -1, 2**70, 1.5, float("nan"), "text", b"bytes", [], [1, "a"], [[1, 2], [3]],
    {b"k": 1}, (1, 2), [True, False, True], [2**64, 1, 2], [-5, 1, 2], [0.0, 1.0, 2.0],
    np.zeros((3, 3072), np.float32), np.zeros((3, 3071), np.uint8), np.zeros(3072, np.uint8),
    np.zeros((0, 3072), np.uint8), np.zeros((3, 3072), np.int64), np.arange(3, dtype=np.uint64),
    np.array([1, 2, 2**63], dtype=np.uint64), np.array(["a", "b", "c"]), np.zeros((3, 1)),
    np.zeros((3, 3072, 1), np.uint8), np.array([0, 1, 10]), np.array([0.5, 1.0, 2.0]),
])


@settings(max_examples=EXAMPLES["cifar fields"], **_SETTINGS)
@given(changes=st.lists(st.tuples(st.sampled_from([b"data", b"labels", "data", "labels", 7]),
                                  st.one_of(st.just("drop"), _ODD_VALUES)), max_size=3),
       protocol=st.sampled_from([2, 5]))
def test_cifar_batches_with_wrong_fields(folder: Path, changes: list, protocol: int) -> None:
    batch = _cifar()
    for key, value in changes:
        if isinstance(value, str) and value == "drop":
            batch.pop(key, None)
        else:
            batch[key] = value
    path = folder / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    _check_cifar(path)


# ----------------------------------------------------------------------------- npz


def _check_npz(path: Path) -> None:
    result = _read_or_refuse(lambda: read_npz(path), DataError)
    if result is None:
        return
    x, y, x_test, y_test = result
    pairs = [(x, y)] + ([] if x_test is None else [(x_test, y_test)])
    for images, labels in pairs:
        assert images.dtype == np.float32 and images.ndim == 4 and 0 not in images.shape
        assert np.isfinite(images).all() and np.abs(images).max() <= MAX_PIXEL
        assert labels.dtype == np.int64 and labels.shape == (len(images),)
        assert labels.min() >= 0 and labels.max() < MAX_CLASSES
        assert images.shape[1:] == x.shape[1:]
    classes = max(int(y.max()), -1 if y_test is None else int(y_test.max())) + 1
    assert classes >= 2 and np.all(np.bincount(y, minlength=classes) > 0)


def _npz_bytes(arrays: dict, compressed: bool) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


NPZ_ARRAYS = {"x": _RNG.random((8, 4, 4)).astype(np.float32), "y": np.arange(8) % 3,
              "x_test": _RNG.integers(0, 256, size=(4, 4, 4), dtype=np.uint8),
              "y_test": np.arange(4) % 3}
NPZ_FILES = [_npz_bytes(NPZ_ARRAYS, compressed) for compressed in (False, True)]


@settings(max_examples=EXAMPLES["npz bytes"], **_SETTINGS)
@given(compressed=st.sampled_from([0, 1]), data=st.data())
def test_mutated_npz_bytes(folder: Path, compressed: int, data: st.DataObject) -> None:
    path = folder / "d.npz"
    path.write_bytes(data.draw(_mutated(NPZ_FILES[compressed])))
    _check_npz(path)


_DTYPES = [np.uint8, np.int8, np.int64, np.uint64, np.float16, np.float32, np.float64,
           np.longdouble, np.complex64, np.bool_, "U3", "V4", object]


def _swap_dtype(a: np.ndarray, dtype, scale: float = 1.0) -> np.ndarray:
    """`a` cast to `dtype` (and multiplied by `scale`), or `a` where numpy cannot cast it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cast may overflow: that is the point
        try:
            return a.astype(dtype) * scale if scale != 1.0 else a.astype(dtype)
        except (ValueError, TypeError, OverflowError):
            return a


@st.composite
def _npz_change(draw: st.DrawFn) -> tuple[str, Callable[[np.ndarray], object]]:
    """One field change: which member, and what to make of it."""
    member = draw(st.sampled_from(["x", "y", "x_test", "y_test"]))
    value = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                           st.integers(-2**64, 2**64)))
    index, cut, dtype = draw(st.integers(0, 63)), draw(st.integers(0, 3)), draw(
        st.sampled_from(_DTYPES))

    def poke(a: np.ndarray) -> np.ndarray:
        """`value` written into one entry, in a dtype that holds it."""
        if isinstance(value, float):
            a = _swap_dtype(a, np.float64)
        elif -2**63 <= value < 2**63:
            a = _swap_dtype(a, np.int64)
        else:
            a = _swap_dtype(a, np.uint64 if 0 <= value < 2**64 else object)
        if a.size:
            a.reshape(-1)[index % a.size] = value
        return a

    changes: list[Callable[[np.ndarray], object]] = [
        lambda a: _swap_dtype(a, dtype),
        poke,
        lambda a: a[:cut],
        lambda a: a.reshape(-1),
        lambda a: a[..., None],
        lambda a: a.reshape(1, *a.shape)[:, :0] if a.size else a,
        lambda a: np.float64(3.0),
        lambda a: _swap_dtype(a, np.float64, 1e300),
        lambda a: _swap_dtype(a, np.float64, 1e39),
        lambda a: np.array([[0, 1], [2, 3]]),
        lambda a: "drop",
    ]
    return member, draw(st.sampled_from(changes))


def _write_npz(path: Path, arrays: dict, compressed: bool) -> None:
    allow_pickle = any(getattr(getattr(a, "dtype", None), "kind", "") == "O"
                       for a in arrays.values())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            if isinstance(array, bytes):  # a member that is no .npy file at all
                archive.writestr(name, array)
                continue
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.asanyarray(array), allow_pickle=allow_pickle)
            archive.writestr(name + ".npy", npy.getvalue(),
                             zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED)
    path.write_bytes(buffer.getvalue())


@settings(max_examples=EXAMPLES["npz fields"], **_SETTINGS)
@given(changes=st.lists(_npz_change(), min_size=1, max_size=3), compressed=st.booleans(),
       raw_member=st.booleans())
def test_npz_files_with_wrong_fields(folder: Path, changes: list, compressed: bool,
                                     raw_member: bool) -> None:
    arrays: dict[str, object] = dict(NPZ_ARRAYS)
    for member, change in changes:
        current = arrays.get(member)
        # each change mutates an array: one an earlier change already made a scalar is left as is
        if isinstance(current, np.ndarray) and current.ndim >= 1:
            value = change(current)
            if isinstance(value, str):
                del arrays[member]
            else:
                arrays[member] = value
    if raw_member:
        arrays["x"] = b"not an array"
    path = folder / "d.npz"
    _write_npz(path, arrays, compressed)
    _check_npz(path)


# ----------------------------------------------------------------------------- TOML

VALID_TOML = b"""# a config
[data]
dataset = "digits"
clients = 3
[models]
models = ["smallcnn", "resnet8"]
[codream]
rounds = 2
dream_lr = 0.05
[privacy]
dp = "off"
[run]
baselines = ["isolated"]
seed = 7
"""
TOML_FIELDS = tuple((VALID_TOML.index(b"= ", VALID_TOML.index(key)) + 2, 1)
                    for key in (b"clients", b"models", b"rounds", b"dream_lr", b"seed"))

_TOML_VALUES = st.sampled_from([
    "1", "-1", "0", "1.5", "nan", "inf", "-inf", "1e400", "99999999999999999999", "true",
    '"x"', "''", "[]", "[1, 2]", '["a", 1]', "{}", "{a = 1}", "[[1]]", "1979-05-27",
    "07:32:00", "1979-05-27T07:32:00Z", '"digits"', '["smallcnn"]', '"none"', "0x10", "1_000",
])
_TABLES = [f"[{name}]" for name in SECTIONS] + ["[section]", "[codream.rounds]"]


@st.composite
def _toml(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(_mutated(VALID_TOML, TOML_FIELDS))
    lines = VALID_TOML.decode().splitlines()
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*KEY_SECTION, *_TABLES, "unknown_key", "a.b"]))
        lines.append(key if key.startswith("[") else f"{key} = {draw(_TOML_VALUES)}")
    return "\n".join(lines).encode()


@settings(max_examples=EXAMPLES["toml"], **_SETTINGS)
@given(text=_toml())
def test_mutated_toml_configs(folder: Path, text: bytes) -> None:
    path = folder / "c.toml"
    path.write_bytes(text)

    def read() -> object:
        values = load_config(path)
        assert set(values) <= set(SECTIONS)
        assert all(set(keys) <= set(SECTIONS[table].key_names())
                   for table, keys in values.items())
        return build_config(values, {})

    _read_or_refuse(read, ConfigError)
