"""Dataset loaders (digits, IDX, CIFAR pickles, npz), partitions and validation splits."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codream_secure import data
from codream_secure.data import (
    DATASET_NAMES,
    PARTITION_SCHEMES,
    label_histogram,
    load_dataset,
    partition,
    split_validation,
)
from codream_secure.errors import ConfigError, DataError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- file writers


def write_idx(
    path: Path, arr: np.ndarray, *, gz: bool = False, header: bytes | None = None
) -> Path:
    """Write `arr` (uint8) as an IDX file; `header` overrides the real one for error tests."""
    if header is None:
        header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    blob = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob)
    path.write_bytes(blob)
    return path


def make_idx_folder(folder: Path, *, n_train=40, n_test=20, hw=(28, 28), gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, *hw), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x, gz=gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y, gz=gz)
        out[prefix] = (x, y)
    return out


def cifar_batch(n: int, label_key: bytes, num_classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"test",
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [b"f%d.png" % i for i in range(n)],
    }


def dump(path: Path, obj, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def make_cifar10(folder: Path, *, n=4, protocol=2) -> dict[str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {}
    for i, name in enumerate(names):
        batches[name] = cifar_batch(n, b"labels", 10, seed=i)
        dump(folder / name, batches[name], protocol)
    return batches


def assert_normalised(ds) -> None:
    """Normalised with the dataset's public constants, never with statistics of its data."""
    c = ds.input_shape[0]
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert (ds.mean, ds.std) == data.public_normalization(ds.name, channels=c)
    assert len(ds.mean) == len(ds.std) == c
    assert ds.x_train.shape[1:] == ds.x_test.shape[1:] == ds.input_shape


def unnormalise(ds, x: np.ndarray) -> np.ndarray:
    return x * np.asarray(ds.std)[None, :, None, None] + np.asarray(ds.mean)[None, :, None, None]


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset()


def test_digits_is_the_default_and_embedded(digits):
    assert data.DEFAULT_DATASET == "digits" and digits.name == "digits"
    assert digits.source == "sklearn digits"
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert len(digits.y_test) == 449  # 25 %
    assert_normalised(digits)
    # Stratified: every class is in the test set in proportion (within one sample).
    full = np.bincount(np.concatenate([digits.y_train, digits.y_test]), minlength=10)
    assert np.all(np.abs(np.bincount(digits.y_test, minlength=10) - full * 449 / 1797) <= 1)
    raw = unnormalise(digits, digits.x_train)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5  # scaled 0..16 -> [0, 1]


def test_digits_split_is_fixed(digits):
    again = load_dataset("digits", seed=123)  # the split does not follow the run seed
    np.testing.assert_array_equal(again.y_test, digits.y_test)
    np.testing.assert_array_equal(again.x_train, digits.x_train)


def test_digits_rejects_data_dir(tmp_path):
    with pytest.raises(ConfigError, match="embedded"):
        load_dataset("digits", tmp_path)


def test_max_train_and_test_subsample_stratified_and_seeded():
    a = load_dataset("digits", max_train=200, max_test=50, seed=1)
    b = load_dataset("digits", max_train=200, max_test=50, seed=1)
    c = load_dataset("digits", max_train=200, max_test=50, seed=2)
    assert len(a.y_train) == 200 and len(a.y_test) == 50
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert not np.array_equal(a.y_train, c.y_train) or not np.array_equal(a.x_train, c.x_train)
    assert np.all(np.abs(np.bincount(a.y_train, minlength=10) - 20) <= 1)
    assert_normalised(a)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_max_train_must_be_positive_int(bad):
    with pytest.raises(ConfigError, match="max_train"):
        load_dataset("digits", max_train=bad)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'") as info:
        load_dataset("imagenet")
    for name in DATASET_NAMES:
        assert name in str(info.value)


# ---------------------------------------------------------------- IDX (MNIST family)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loads_plain_and_gzipped(tmp_path, gz, name):
    raw = make_idx_folder(tmp_path, gz=gz)
    ds = load_dataset(name, tmp_path)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert len(ds.y_train) == 40 and len(ds.y_test) == 20
    assert ds.source == str(tmp_path)
    assert_normalised(ds)
    np.testing.assert_array_equal(ds.y_train, raw["train"][1])
    np.testing.assert_allclose(unnormalise(ds, ds.x_test)[:, 0], raw["t10k"][0] / 255.0, atol=1e-5)


def test_idx_accepts_torchvision_raw_folder_and_dotted_names(tmp_path):
    folder = tmp_path / "MNIST" / "raw"
    make_idx_folder(folder, hw=(12, 10))
    for f in folder.iterdir():  # MNIST mirrors spell it train-images.idx3-ubyte
        f.rename(folder / f.name.replace("-idx", ".idx"))
    ds = load_dataset("mnist", tmp_path)
    assert ds.input_shape == (1, 12, 10) and ds.source == str(folder)


def test_real_gzip_detected_by_content(tmp_path):
    make_idx_folder(tmp_path)
    f = tmp_path / "t10k-labels-idx1-ubyte"
    f.write_bytes(gzip.compress(f.read_bytes()))  # gzipped under the plain name
    assert len(load_dataset("mnist", tmp_path).y_test) == 20


def _corrupt(folder: Path, name: str, blob: bytes) -> None:
    (folder / name).write_bytes(blob)


@pytest.mark.parametrize(
    ("target", "blob", "match"),
    [
        ("train-images-idx3-ubyte", b"\x12\x34\x08\x03" + bytes(12), "bad IDX magic"),
        ("train-images-idx3-ubyte", b"\x00\x00\x0d\x03" + bytes(12), "data type 0x0d"),
        ("train-labels-idx1-ubyte", b"\x00\x00\x08\x03" + bytes(12), "3 dimensions, expected 1"),
        ("train-images-idx3-ubyte", b"\x00\x00", "too short"),
        ("train-images-idx3-ubyte", b"\x00\x00\x08\x03" + bytes(4), "truncated IDX header"),
        ("train-labels-idx1-ubyte", b"\x1f\x8bnot really gzip", "not a valid gzip"),
    ],
)
def test_idx_malformed_headers(tmp_path, target, blob, match):
    make_idx_folder(tmp_path)
    _corrupt(tmp_path, target, blob)
    with pytest.raises(DataError, match=match):
        load_dataset("mnist", tmp_path)


def test_idx_size_mismatch(tmp_path):
    make_idx_folder(tmp_path)
    x = np.zeros((40, 28, 28), np.uint8)
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (41, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte", x, header=header)
    with pytest.raises(DataError, match=r"IDX header says \(41, 28, 28\)"):
        load_dataset("mnist", tmp_path)


def test_idx_image_label_count_mismatch(tmp_path):
    make_idx_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(39, np.uint8))
    with pytest.raises(DataError, match=r"40 images but .* 39 labels"):
        load_dataset("mnist", tmp_path)


def test_idx_labels_out_of_range(tmp_path):
    make_idx_folder(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(20, 10, np.uint8))
    with pytest.raises(DataError, match=r"labels out of range \[0, 10\)"):
        load_dataset("mnist", tmp_path)


def test_idx_train_test_shape_mismatch(tmp_path):
    make_idx_folder(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((20, 14, 14), np.uint8))
    with pytest.raises(DataError, match="train images"):
        load_dataset("mnist", tmp_path)


def test_idx_missing_file_names_it(tmp_path):
    make_idx_folder(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing t10k-images-idx3-ubyte\[\.gz\]"):
        load_dataset("mnist", tmp_path)


def test_missing_folder_names_path_and_fashion_hint(tmp_path, monkeypatch):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere") as info:
        load_dataset("fashion-mnist", nowhere)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert "--data-dir" in str(info.value)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", nowhere)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    with pytest.raises(DataError, match="nowhere"):
        load_dataset("mnist", nowhere)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "npz"])
def test_formats_without_bundled_copy_need_data_dir(name):
    with pytest.raises(DataError, match="data-dir"):
        load_dataset(name)


@pytest.mark.slow
@pytest.mark.skipif(
    not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian dataset-fashion-mnist not installed",
)
def test_real_debian_fashion_mnist():
    ds = load_dataset("fashion-mnist")
    assert ds.source == str(DEBIAN_FMNIST)
    assert len(ds.y_train) == 60000 and len(ds.y_test) == 10000
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert np.all(np.bincount(ds.y_train) == 6000) and np.all(np.bincount(ds.y_test) == 1000)
    assert_normalised(ds)
    # the published constants are the full training set's pixel mean and std
    raw = unnormalise(ds, ds.x_train)
    assert abs(raw.mean() - 0.2860) < 1e-3 and abs(raw.std() - 0.3530) < 1e-3


# ---------------------------------------------------------------- CIFAR pickles


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("subfolder", [False, True])
def test_cifar10_batches(tmp_path, protocol, subfolder):
    folder = tmp_path / "cifar-10-batches-py" if subfolder else tmp_path
    batches = make_cifar10(folder, protocol=protocol)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10 and ds.source == str(folder)
    assert len(ds.y_train) == 20 and len(ds.y_test) == 4
    assert_normalised(ds)
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])
    # Rows are 1024 red, then green, then blue values (row-major 32x32).
    want = batches["data_batch_2"][b"data"].reshape(-1, 3, 32, 32) / 255.0
    np.testing.assert_allclose(unnormalise(ds, ds.x_train[4:8]), want, atol=1e-5)


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = cifar_batch(6, b"fine_labels", 100, seed=0)
    train[b"fine_labels"][0] = 99
    dump(folder / "train", train)
    dump(folder / "test", cifar_batch(3, b"fine_labels", 100, seed=1))
    ds = load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and len(ds.y_train) == 6 and ds.y_train[0] == 99
    assert_normalised(ds)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    batch = cifar_batch(4, b"labels", 10, seed=0)
    batch[b"x"] = evil
    dump(tmp_path / "data_batch_3", batch)
    with pytest.raises(DataError, match="not allowed"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_pickle_rejects_builtin_eval(tmp_path):
    make_cifar10(tmp_path)
    # GLOBAL builtins.eval, then call it: a classic pickle exploit written by hand.
    blob = b"cbuiltins\neval\n(S'1+1'\ntR."
    (tmp_path / "test_batch").write_bytes(blob)
    with pytest.raises(DataError, match=r"builtins\.eval.*not allowed"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b.pop(b"labels"), "lacks"),
        (lambda b: b.__setitem__(b"data", b[b"data"][:, :100]), "expected 3072"),
        (lambda b: b.__setitem__(b"data", b[b"data"].astype(np.float32)), "uint8"),
        (lambda b: b.__setitem__(b"labels", [1, 2, 3]), "4 images but 3 labels"),
        (lambda b: b.__setitem__(b"labels", [0, 1, 2, 10]), r"out of range \[0, 10\)"),
        (lambda b: b.__setitem__(b"labels", ["a", "b", "c", "d"]), "integers"),
    ],
)
def test_cifar_wrong_content(tmp_path, mutate, match):
    make_cifar10(tmp_path)
    batch = cifar_batch(4, b"labels", 10, seed=0)
    mutate(batch)
    dump(tmp_path / "data_batch_1", batch)
    with pytest.raises(DataError, match=match):
        load_dataset("cifar10", tmp_path)


def test_cifar_not_a_dict_or_not_a_pickle(tmp_path):
    make_cifar10(tmp_path)
    dump(tmp_path / "data_batch_1", [1, 2, 3])
    with pytest.raises(DataError, match="expected a dict"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "data_batch_1").write_bytes(b"this is no pickle")
    with pytest.raises(DataError, match="not a readable pickle"):
        load_dataset("cifar10", tmp_path)


def test_cifar_missing_batch_and_folder(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(DataError, match="missing data_batch_4"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_dataset("cifar100", tmp_path / "absent")


# ---------------------------------------------------------------- npz


def test_npz_grayscale_nhw_uint8_with_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(80, 6, 5), dtype=np.uint8)
    y = np.arange(80) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset("npz", tmp_path / "d.npz")
    assert ds.input_shape == (1, 6, 5) and ds.num_classes == 4
    assert len(ds.y_test) == 20 and len(ds.y_train) == 60
    assert np.all(np.bincount(ds.y_test) == 5)  # fixed stratified split
    assert_normalised(ds)
    raw = unnormalise(ds, ds.x_train)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5  # uint8 scaled to [0, 1]


def test_npz_channels_last_with_test_arrays(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(12, 7, 9, 3), dtype=np.uint8)
    xt = rng.integers(0, 256, size=(5, 7, 9, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(12) % 3, x_test=xt, y_test=np.arange(5) % 3)
    ds = load_dataset("npz", tmp_path / "d.npz")
    assert ds.input_shape == (3, 7, 9) and len(ds.y_test) == 5
    want = xt.transpose(0, 3, 1, 2) / 255.0
    np.testing.assert_allclose(unnormalise(ds, ds.x_test), want, atol=1e-5)


def test_npz_channels_first_float(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(30, 3, 4, 4)).astype(np.float64)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(30) % 2)
    ds = load_dataset("npz", tmp_path / "d.npz", max_train=10)
    assert ds.input_shape == (3, 4, 4) and len(ds.y_train) == 10 and ds.num_classes == 2
    assert_normalised(ds)
    assert np.isin(ds.x_train, x.astype(np.float32)).all()  # floats: not rescaled, not shifted


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((4, 2, 2), np.uint8)}, r"missing array\(s\) \['y'\]"),
        ({"x": np.zeros((4, 2, 2)), "y": np.zeros(3, int)}, "4 images but 3 labels"),
        ({"x": np.zeros((4, 2, 2)), "y": np.array([0, 1, -1, 0])}, "out of range"),
        ({"x": np.zeros((4, 2, 2)), "y": np.zeros(4)}, "integer"),
        ({"x": np.zeros((4, 4)), "y": np.zeros(4, int)}, "shape"),
        ({"x": np.zeros((4, 2, 2), np.int32), "y": np.zeros(4, int)}, "uint8 or floating"),
        ({"x": np.full((4, 2, 2), np.nan), "y": np.zeros(4, int)}, "NaN"),
        (
            {"x": np.zeros((4, 2, 2)), "y": np.zeros(4, int), "x_test": np.zeros((2, 2, 2))},
            "together",
        ),
        (
            {"x": np.zeros((4, 2, 2)), "y": np.zeros(4, int), "x_test": np.zeros((2, 3, 3)),
             "y_test": np.zeros(2, int)},
            "differ",
        ),
        ({"x": np.zeros((1, 2, 2)), "y": np.zeros(1, int)}, "at least 2"),
        ({"x": np.zeros((4, 2, 2)), "y": np.array([0, 1, 200_000_000, 1])},
         r"up to 200000000, i.e. 200,000,001 classes \(3 of them present\)"),
    ],
)  # fmt: skip
def test_npz_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_dataset("npz", tmp_path / "d.npz")


def test_npz_missing_or_garbage_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset("npz", tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable"):
        load_dataset("npz", tmp_path / "junk.npz")
    # a path of the wrong kind says which kind was expected
    with pytest.raises(DataError, match=r"it is a folder; --data-dir takes the \.npz file"):
        load_dataset("npz", tmp_path)
    for name in ("mnist", "cifar10"):
        with pytest.raises(DataError, match="it is a file; --data-dir takes the dataset's"):
            load_dataset(name, tmp_path / "junk.npz")


# ---------------------------------------------------------------- partitions


LABELS = np.random.default_rng(7).permutation(np.repeat(np.arange(10), 200))


def max_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    h = label_histogram(labels, parts, 10)
    return float(np.mean(h.max(axis=1) / h.sum(axis=1)))


def check_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@pytest.mark.parametrize("scheme", PARTITION_SCHEMES)
def test_partition_disjoint_complete_deterministic(scheme):
    parts = partition(LABELS, 5, scheme=scheme, alpha=0.5, seed=3)
    assert len(parts) == 5
    check_exact_cover(parts, len(LABELS))
    again = partition(LABELS, 5, scheme=scheme, alpha=0.5, seed=3)
    other = partition(LABELS, 5, scheme=scheme, alpha=0.5, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_is_balanced_in_size_and_labels():
    parts = partition(LABELS, 7, scheme="iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    h = label_histogram(LABELS, parts, 10)
    assert np.all(h.max(axis=0) - h.min(axis=0) <= 1)


def test_small_alpha_dirichlet_is_skewed_and_respects_min_samples():
    iid = max_share(LABELS, partition(LABELS, 4, scheme="iid", seed=0))
    shares = []
    for seed in range(3):
        parts = partition(LABELS, 4, scheme="dirichlet", alpha=0.1, seed=seed, min_samples=30)
        assert min(len(p) for p in parts) >= 30
        shares.append(max_share(LABELS, parts))
    assert iid < 0.15 and np.mean(shares) > 0.4
    wide = partition(LABELS, 4, scheme="dirichlet", alpha=1000.0, seed=0)
    assert max_share(LABELS, wide) < 0.15


def test_balanced_dirichlet_sizes_equal_and_labels_skewed():
    for n_clients in (3, 4, 7):
        parts = partition(LABELS, n_clients, scheme="balanced-dirichlet", alpha=0.1, seed=1)
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1  # stated tolerance: within one sample
        check_exact_cover(parts, len(LABELS))
    # With equal quotas a client can hold at most 200 of a class (0.4 of 500): skew is capped.
    shares = [
        max_share(LABELS, partition(LABELS, 4, scheme="balanced-dirichlet", alpha=0.1, seed=s))
        for s in range(3)
    ]
    assert np.mean(shares) > 0.22  # iid gives 0.10
    flat = partition(LABELS, 4, scheme="balanced-dirichlet", alpha=1000.0, seed=1)
    assert max_share(LABELS, flat) < 0.15


def test_partition_on_real_digits_labels(digits):
    for scheme in PARTITION_SCHEMES:
        parts = partition(digits.y_train, 4, scheme=scheme, alpha=0.1, seed=0)
        check_exact_cover(parts, len(digits.y_train))


def test_single_client_gets_everything():
    (only,) = partition(LABELS, 1, scheme="dirichlet", seed=0)
    np.testing.assert_array_equal(only, np.arange(len(LABELS)))


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=120),
    n_clients=st.integers(1, 6),
    scheme=st.sampled_from(PARTITION_SCHEMES),
    alpha=st.floats(0.05, 50.0),
    seed=st.integers(0, 2**32),
)
def test_partition_property(labels, n_clients, scheme, alpha, seed):
    y = np.asarray(labels)
    if len(y) < n_clients:
        with pytest.raises(DataError):
            partition(y, n_clients, scheme=scheme, alpha=alpha, seed=seed, min_samples=1)
        return
    try:
        parts = partition(y, n_clients, scheme=scheme, alpha=alpha, seed=seed, min_samples=1)
    except DataError as exc:  # tiny skewed draws may never give every client a sample
        assert scheme == "dirichlet" and "1000 tries" in str(exc)
        return
    check_exact_cover(parts, len(y))
    assert all(len(p) >= 1 for p in parts)
    if scheme != "dirichlet":
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_clients": 0}, ConfigError, "n_clients"),
        ({"n_clients": 2.0}, ConfigError, "n_clients"),
        ({"alpha": 0.0}, ConfigError, "alpha"),
        ({"alpha": -1.0}, ConfigError, "alpha"),
        ({"alpha": float("nan")}, ConfigError, "alpha"),
        ({"scheme": "shards"}, ConfigError, "unknown partition scheme"),
        ({"min_samples": -1}, ConfigError, "min_samples"),
        ({"n_clients": 2001}, DataError, "2000 samples cannot be shared among 2001"),
        ({"n_clients": 201}, DataError, "10 samples .use fewer --clients"),
    ],
)
def test_partition_errors(kwargs, error, match):
    args = {"n_clients": 4, "scheme": "iid", "alpha": 0.1, "seed": 0, **kwargs}
    n_clients = args.pop("n_clients")
    with pytest.raises(error, match=match):
        partition(LABELS, n_clients, **args)


def test_partition_rejects_bad_labels():
    with pytest.raises(DataError, match="1-D integer"):
        partition(np.zeros((4, 2), int), 2, scheme="iid", seed=0, min_samples=1)
    with pytest.raises(DataError, match="1-D integer"):
        partition(np.zeros(4), 2, scheme="iid", seed=0, min_samples=1)
    with pytest.raises(DataError, match="negative"):
        partition(np.array([0, -1, 1, 0]), 2, scheme="iid", seed=0, min_samples=1)


def test_dirichlet_gives_up_with_clear_error():
    y = np.zeros(100, dtype=np.int64)  # one class: only an exactly even cut satisfies min 10
    with pytest.raises(DataError, match="1000 tries; raise --alpha"):
        partition(y, 10, scheme="dirichlet", alpha=0.01, seed=0, min_samples=10)


# ---------------------------------------------------------------- validation split


def test_split_validation_stratified_disjoint_deterministic():
    idx = partition(LABELS, 3, scheme="dirichlet", alpha=1.0, seed=0)[0]
    train, val = split_validation(idx, LABELS, fraction=0.2, seed=5)
    assert len(val) == round(0.2 * len(idx))
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), idx)
    assert not set(train.tolist()) & set(val.tolist())
    counts = np.bincount(LABELS[idx], minlength=10)
    assert np.all(np.abs(np.bincount(LABELS[val], minlength=10) - 0.2 * counts) <= 1)
    t2, v2 = split_validation(idx, LABELS, fraction=0.2, seed=5)
    np.testing.assert_array_equal(v2, val)
    np.testing.assert_array_equal(t2, train)
    _, v3 = split_validation(idx, LABELS, fraction=0.2, seed=6)
    assert not np.array_equal(v3, val)


def test_split_validation_edges():
    train, val = split_validation(np.arange(10), LABELS, fraction=0.0, seed=0)
    assert len(train) == 10 and len(val) == 0
    train, val = split_validation(np.array([3]), LABELS, fraction=0.5, seed=0)
    assert train.tolist() == [3] and len(val) == 0  # one sample: nothing to hold out
    train, val = split_validation(np.array([3, 9]), LABELS, fraction=0.01, seed=0)
    assert len(train) == len(val) == 1  # at least one validation sample when possible
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="fraction"):
            split_validation(np.arange(10), LABELS, fraction=bad, seed=0)
    with pytest.raises(DataError, match="out of range"):
        split_validation(np.array([0, 5000]), LABELS, fraction=0.5, seed=0)


# ---------------------------------------------------------------- normalisation constants


def test_normalisation_does_not_depend_on_which_clients_data_is_loaded():
    whole = load_dataset("digits")
    for kw in ({"max_train": 200, "seed": 1}, {"max_train": 400, "seed": 7}):
        part = load_dataset("digits", **kw)
        assert (part.mean, part.std) == (whole.mean, whole.std)
        # the same raw image maps to the same input whatever else was loaded with it
        np.testing.assert_array_equal(part.x_test, whole.x_test)
    # control: the pooled statistics of the two subsamples differ, so using them would show
    a, b = (load_dataset("digits", max_train=200, seed=s) for s in (1, 7))
    raw_a, raw_b = unnormalise(a, a.x_train), unnormalise(b, b.x_train)
    assert abs(float(raw_a.mean()) - float(raw_b.mean())) > 1e-4


def test_user_normalisation_constants(tmp_path):
    x = np.full((20, 2, 2), 100, dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20) % 2)
    ds = load_dataset("npz", tmp_path / "d.npz", normalization=((0.25,), (0.5,)))
    assert (ds.mean, ds.std) == ((0.25,), (0.5,))
    np.testing.assert_allclose(ds.x_train, (100 / 255 - 0.25) / 0.5, rtol=1e-6)
    with pytest.raises(ConfigError, match="one mean and one std per channel"):
        load_dataset("npz", tmp_path / "d.npz", normalization=((0.2, 0.2), (0.5, 0.5)))
    with pytest.raises(ConfigError, match="stds finite and > 0"):
        load_dataset("npz", tmp_path / "d.npz", normalization=((0.2,), (0.0,)))
