"""Datasets (embedded default, standard on-disk formats) and client partitions, as numpy arrays."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from codream_secure.errors import ConfigError, DataError
from codream_secure.formats import MAX_CLASSES, read_cifar_dataset, read_idx_dataset
from codream_secure.npz_format import read_npz

DATASET_NAMES: tuple[str, ...] = ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "npz")
DEFAULT_DATASET = "digits"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist
TEST_FRACTION = 0.25  # fixed held-out share for datasets that ship without a test split
SPLIT_SEED = 0  # that split never depends on the run's seed, so test sets stay comparable

# Normalisation constants that never come from the clients' data (statistics of the pooled
# training data are known to no client, and releasing them would be an unaccounted DP release).
# digits: its known pixel range [0, 1] mapped onto [-1, 1]; the others: the constants published
# for each dataset's full training set (pixel mean and standard deviation per channel).
PUBLIC_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.5,), (0.5,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

PartitionScheme = Literal["iid", "dirichlet", "balanced-dirichlet"]
PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "balanced-dirichlet")


@dataclass(frozen=True, eq=False)
class LoadedDataset:
    """Train/test arrays (float32 N×C×H×W, normalised with public constants) and their metadata."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str


def load_dataset(
    name: str = DEFAULT_DATASET,
    data_dir: str | Path | None = None,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> LoadedDataset:
    """Load a dataset by name; `max_train`/`max_test` take a stratified sample seeded by `seed`.

    Inputs are normalised with `normalization` (per-channel mean, std) if given, else with
    public_normalization(name, ...): never with statistics of the loaded data.
    """
    loaders = {
        "digits": _load_digits,
        "fashion-mnist": _load_fashion_mnist,
        "mnist": _load_mnist,
        "cifar10": _load_cifar10,
        "cifar100": _load_cifar100,
        "npz": _load_npz,
    }
    if name not in loaders:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    for arg, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise ConfigError(f"{arg} must be a positive integer or None, got {value!r}")
    path = Path(data_dir).expanduser() if data_dir is not None else None
    x_tr, y_tr, x_te, y_te, num_classes, source = loaders[name](path)
    rng = np.random.default_rng(seed)
    if max_train is not None and max_train < len(y_tr):
        keep = np.sort(_stratified_pick(y_tr, max_train, rng))
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    if max_test is not None and max_test < len(y_te):
        keep = np.sort(_stratified_pick(y_te, max_test, rng))
        x_te, y_te = x_te[keep], y_te[keep]
    x_tr, x_te = _to_unit_float(x_tr), _to_unit_float(x_te)
    mean, std = _checked_normalization(
        normalization or public_normalization(name, channels=x_tr.shape[1]),
        channels=x_tr.shape[1])
    shift = np.asarray(mean, dtype=np.float32)[None, :, None, None]
    scale = np.asarray(std, dtype=np.float32)[None, :, None, None]
    for x in (x_tr, x_te):  # in place: every loader hands over fresh arrays, and CIFAR is big
        x -= shift
        x /= scale
    return LoadedDataset(
        name=name,
        x_train=x_tr,
        y_train=y_tr.astype(np.int64),
        x_test=x_te,
        y_test=y_te.astype(np.int64),
        num_classes=int(num_classes),
        input_shape=(int(x_tr.shape[1]), int(x_tr.shape[2]), int(x_tr.shape[3])),
        mean=mean,
        std=std,
        source=source,
    )


_Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, str]


def public_normalization(name: str, *, channels: int
                         ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel fixed before any data is seen: PUBLIC_NORMALIZATION, or for npz
    no change (uint8 pixels are already scaled to [0, 1]; other constants come from the user)."""
    if name in PUBLIC_NORMALIZATION:
        return PUBLIC_NORMALIZATION[name]
    return (0.0,) * channels, (1.0,) * channels


def _checked_normalization(norm: tuple[tuple[float, ...], tuple[float, ...]], *, channels: int
                           ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = (tuple(float(v) for v in values) for values in norm)
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"normalisation needs one mean and one std per channel ({channels}), "
                          f"got {len(mean)} and {len(std)}")
    if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
        raise ConfigError(f"normalisation: means must be finite and stds finite and > 0, got "
                          f"mean {mean} std {std}")
    return mean, std


def _to_unit_float(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    return x.astype(np.float32, copy=False)


def _load_digits(path: Path | None) -> _Raw:
    if path is not None:
        raise ConfigError("digits is embedded (scikit-learn); it takes no data_dir")
    from sklearn.datasets import load_digits  # lazy: sklearn import is slow

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    y = bunch.target.astype(np.int64)
    train, test = _fixed_split(y)
    return x[train], y[train], x[test], y[test], 10, "sklearn digits"


def _idx(path: Path, *subdirs: str, hint: str) -> _Raw:
    x_tr, y_tr, x_te, y_te, folder = read_idx_dataset(path, *subdirs, hint=hint)
    return x_tr, y_tr, x_te, y_te, 10, str(folder)


def _load_fashion_mnist(path: Path | None) -> _Raw:
    hint = " (install it with `apt-get install dataset-fashion-mnist` or pass --data-dir)"
    return _idx(path or FASHION_MNIST_DIR, "raw", "FashionMNIST/raw", hint=hint)


def _load_mnist(path: Path | None) -> _Raw:
    if path is None:
        raise DataError("mnist has no bundled copy: pass --data-dir with the IDX files")
    return _idx(path, "raw", "MNIST/raw", hint="")


def _load_cifar10(path: Path | None) -> _Raw:
    if path is None:
        raise DataError("cifar10 has no bundled copy: pass --data-dir with the python batches")
    x_tr, y_tr, x_te, y_te, folder = read_cifar_dataset(path, num_classes=10)
    return x_tr, y_tr, x_te, y_te, 10, str(folder)


def _load_cifar100(path: Path | None) -> _Raw:
    if path is None:
        raise DataError("cifar100 has no bundled copy: pass --data-dir with the python files")
    x_tr, y_tr, x_te, y_te, folder = read_cifar_dataset(path, num_classes=100)
    return x_tr, y_tr, x_te, y_te, 100, str(folder)


def _load_npz(path: Path | None) -> _Raw:
    if path is None:
        raise DataError("npz needs --data-dir pointing at the .npz file")
    x, y, x_te, y_te = read_npz(path)
    if x_te is None or y_te is None:
        if len(y) < 2:
            raise DataError(f"{path}: need at least 2 samples to split off a test set")
        train, test = _fixed_split(y)
        x, y, x_te, y_te = x[train], y[train], x[test], y[test]
    num_classes = int(max(y.max(initial=-1), y_te.max(initial=-1))) + 1
    if len(y) == 0 or len(y_te) == 0:
        raise DataError(f"{path}: train and test sets must both be non-empty")
    if num_classes > MAX_CLASSES:  # every model's output layer has one unit per class
        present = len(np.union1d(y, y_te))
        raise DataError(f"{path}: labels run up to {num_classes - 1}, i.e. {num_classes:,} "
                        f"classes ({present:,} of them present); labels must be class indices "
                        f"0..K-1 with K <= {MAX_CLASSES:,}: relabel them")
    return x, y, x_te, y_te, num_classes, str(path)


def _fixed_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed stratified train/test split used where a dataset has none."""
    n_test = min(max(1, round(TEST_FRACTION * len(labels))), len(labels) - 1)
    test = np.sort(_stratified_pick(labels, n_test, np.random.default_rng(SPLIT_SEED)))
    return np.setdiff1d(np.arange(len(labels)), test), test


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions sorted by class, shuffled within each class."""
    perm = rng.permutation(len(labels))
    return perm[np.argsort(labels[perm], kind="stable")]


def _stratified_pick(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct positions; each class gets within one of its proportional share."""
    # Evenly spaced picks (spacing n/k >= 1, so distinct) over a class-sorted order hit each
    # contiguous class block proportionally to its length.
    n = len(labels)
    pos = np.floor((np.arange(k) + rng.random()) * (n / k)).astype(np.int64)
    return _stratified_order(labels, rng)[np.minimum(pos, n - 1)]


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise DataError(f"labels out of range: negative label {int(labels.min())}")
    return labels


def partition(
    labels: np.ndarray,
    n_clients: int,
    *,
    scheme: PartitionScheme,
    alpha: float = 0.1,
    seed: int,
    min_samples: int = 10,
) -> list[np.ndarray]:
    """Split sample indices among clients: disjoint sorted int64 arrays covering every sample."""
    labels = _check_labels(labels)
    if scheme not in PARTITION_SCHEMES:
        raise ConfigError(
            f"unknown partition scheme {scheme!r}; valid: {', '.join(PARTITION_SCHEMES)}"
        )
    if not isinstance(n_clients, int) or isinstance(n_clients, bool) or n_clients < 1:
        raise ConfigError(f"n_clients must be an integer >= 1, got {n_clients!r}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ConfigError(f"Dirichlet alpha must be a positive number, got {alpha!r}")
    if not isinstance(min_samples, int) or min_samples < 0:
        raise ConfigError(f"min_samples must be a non-negative integer, got {min_samples!r}")
    n = len(labels)
    if n < n_clients:
        raise DataError(f"{n} samples cannot be shared among {n_clients} clients")
    if n < n_clients * min_samples:
        raise DataError(
            f"{n} samples cannot give each of {n_clients} clients {min_samples} samples "
            "(use fewer --clients or a larger [data] max_train)"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = _iid(labels, n_clients, rng)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, n_clients, alpha, min_samples, rng)
    else:
        parts = _balanced_dirichlet(labels, n_clients, alpha, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _iid(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    # Dealing a class-sorted shuffled order round-robin gives sizes and per-class counts within 1.
    order = _stratified_order(labels, rng)
    owner = rng.permutation(n_clients)[np.arange(len(order)) % n_clients]
    return [order[owner == c] for c in range(n_clients)]


def _dirichlet(
    labels: np.ndarray, n_clients: int, alpha: float, min_samples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    # Classic label skew (Hsu et al. 2019): each class is cut among clients by Dirichlet(alpha)
    # proportions; redraw everything until every client holds min_samples.
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            cuts = (np.cumsum(rng.dirichlet(np.full(n_clients, alpha))) * len(idx)).astype(int)
            for c, piece in enumerate(np.split(idx, cuts[:-1])):
                parts[c].append(piece)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_samples:
            return merged
    raise DataError(
        f"no Dirichlet(alpha={alpha}) draw gave all {n_clients} clients {min_samples} samples "
        "in 1000 tries; raise --alpha, use fewer --clients or --partition balanced-dirichlet"
    )


def _balanced_dirichlet(
    labels: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    # As in the official CoDream code (non_iid_balanced_clients, after FedDyn): client k draws a
    # class prior p_k ~ Dirichlet(alpha); clients have equal quotas (here N // n, +1 for the first
    # N % n) and take one sample at a time of a class drawn from p_k. A class that runs out is
    # removed from every prior. Clients take turns in a random order.
    classes = np.unique(labels)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    priors = rng.dirichlet(np.full(len(classes), alpha), size=n_clients)
    quotas = np.full(n_clients, len(labels) // n_clients)
    quotas[: len(labels) % n_clients] += 1
    turns = rng.permutation(np.repeat(np.arange(n_clients), quotas))
    draws = rng.random(len(turns))

    def cdfs() -> list[list[float]]:
        alive = np.array([len(p) > 0 for p in pools], dtype=np.float64)
        w = priors * alive
        w[w.sum(axis=1) <= 0] = alive  # a prior that underflowed on the live classes: uniform
        return np.cumsum(w, axis=1).tolist()

    cdf = cdfs()
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for client, u in zip(turns.tolist(), draws.tolist(), strict=True):
        row = cdf[client]
        k = bisect.bisect_right(row, u * row[-1])  # lands only on classes with positive weight
        parts[client].append(pools[k].pop())
        if not pools[k]:
            cdf = cdfs()
    return [np.asarray(p, dtype=np.int64) for p in parts]


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-client class counts, shape (n_clients, num_classes)."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def split_validation(
    indices: np.ndarray, labels: np.ndarray, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a stratified `fraction` of a client's `indices` (into `labels`) for validation."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"validation fraction must be in [0, 1), got {fraction!r}")
    indices = np.asarray(indices, dtype=np.int64)
    labels = _check_labels(labels)
    if indices.size and (indices.min() < 0 or indices.max() >= len(labels)):
        raise DataError(f"indices out of range for {len(labels)} labels")
    n = len(indices)
    n_val = min(max(1, round(fraction * n)), n - 1) if fraction > 0 and n >= 2 else 0
    if n_val == 0:
        return np.sort(indices), np.empty(0, dtype=np.int64)
    picked = _stratified_pick(labels[indices], n_val, np.random.default_rng(seed))
    mask = np.zeros(n, dtype=bool)
    mask[picked] = True
    return np.sort(indices[~mask]), np.sort(indices[mask])
