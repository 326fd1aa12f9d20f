"""Leakage (a): are released dreams closer to the clients' training data than to unseen data?

A short CoDream run on digits releases its dream buffer (what every client and the server get).
Each dream's nearest-neighbour similarity (PSNR, SSIM, cosine in an outside model's feature
space) to the clients' training union is compared with its similarity to a held-out set of the
same size and distribution; the memorisation gap is the mean difference, with a bootstrap CI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from codream_secure.audit.leakage.metrics import (
    PSNR_CAP_DB,
    bootstrap_mean_ci,
    cap_psnr,
    cosine_matrix,
    psnr_matrix,
    ssim_matrix,
    ssim_window,
    subsampled_nearest,
    to_unit_pixels,
)
from codream_secure.audit.reporting import SectionResult, save_figure
from codream_secure.baselines import client_seed, seeded_model
from codream_secure.config import SimulationConfig
from codream_secure.data import LoadedDataset, load_dataset, partition, split_validation
from codream_secure.distill import evaluate, train_local
from codream_secure.dreams import model_mode
from codream_secure.federation import AggregationChannel, CoDreamFederation
from codream_secure.federation import generator as seeded_generator
from codream_secure.results import ClientData

__all__ = ["DEFAULT", "FULL", "TINY", "DreamData", "DreamsSettings", "embedder", "gap_rows",
           "prepare", "run", "similarity_table", "torch_threads"]

METRICS = ("psnr", "ssim", "cosine")


@dataclass(frozen=True)
class DreamsSettings:
    """A short CoDream run, the reference sets and the statistics of section (a)."""

    clients: int = 4
    models: tuple[str, ...] = ("smallcnn", "resnet8", "wrn16_1", "smallcnn")
    server_model: str = "resnet8"
    alpha: float = 0.1
    rounds: int = 3
    warmup_epochs: int = 10
    local_epochs: int = 2
    dream_batch: int = 64
    dream_steps: int = 150
    buffer_size: int = 640
    aggregator: str = "secagg"
    feature_fraction: float = 0.3  # share of the train split kept for the feature model alone
    feature_model: str = "smallcnn"
    feature_epochs: int = 20
    max_reference: int | None = None  # cap on the held-out size (tiny runs)
    subsamples: int = 5
    bootstrap: int = 2000
    threads: int = 1  # torch intra-op threads; these models are too small to gain from more
    seed: int = 0


TINY = DreamsSettings(clients=2, models=("smallcnn",), server_model="smallcnn", rounds=1,
                      warmup_epochs=1, local_epochs=1, dream_batch=16, dream_steps=5,
                      buffer_size=16, aggregator="plain", feature_epochs=1, max_reference=60,
                      subsamples=2, bootstrap=200)
DEFAULT = DreamsSettings()
FULL = DreamsSettings(rounds=10, dream_steps=500, dream_batch=128, buffer_size=1280,
                      subsamples=20, bootstrap=10000)


@dataclass
class DreamData:
    """The released dreams (the attacker's view) and the private/held-out references, in [0, 1]."""

    dreams: np.ndarray
    train: np.ndarray
    heldout: np.ndarray
    unseen: np.ndarray  # real digits in neither reference set (the feature model's split)
    embed: Callable[[np.ndarray], np.ndarray]
    feature_accuracy: float
    client_accuracy: list[float]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch intra-op threads, then restore the previous count.

    Measured here: a smallcnn dream step takes 13 ms on one thread but 130-200 ms on two when
    other processes share the two cores (intra-op threads spin-wait for each other).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _config(s: DreamsSettings) -> SimulationConfig:
    return SimulationConfig.from_keys(
        clients=s.clients, models=s.models, server_model=s.server_model, alpha=s.alpha,
        rounds=s.rounds, warmup_epochs=s.warmup_epochs, local_epochs=s.local_epochs,
        dream_batch=s.dream_batch, dream_steps=s.dream_steps, buffer_size=s.buffer_size,
        aggregator=s.aggregator, seed=s.seed, device="cpu")


def embedder(model: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...]
             ) -> Callable[[np.ndarray], np.ndarray]:
    """[0, 1] images -> the model's penultimate features (the input of its last linear layer)."""
    shift = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    scale = torch.tensor(std, dtype=torch.float32)[None, :, None, None]

    @torch.no_grad()
    def embed(x01: np.ndarray) -> np.ndarray:
        seen: list[torch.Tensor] = []
        hook = model.fc.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
        try:
            with model_mode(model, training=False):
                model((torch.from_numpy(x01).float() - shift) / scale)
        finally:
            hook.remove()
        return seen[0].double().numpy()

    return embed


def _run_codream(s: DreamsSettings, data: LoadedDataset, pool: np.ndarray, val: np.ndarray,
                 progress) -> tuple[torch.Tensor, list[float]]:
    config = _config(s)
    parts = partition(data.y_train[pool], s.clients, scheme="dirichlet", alpha=s.alpha,
                      seed=s.seed)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    clients = [ClientData(x[pool[p]], y[pool[p]], x[val], y[val]) for p in parts]
    shape, classes = data.input_shape, data.num_classes
    models = [seeded_model(name, input_shape=shape, num_classes=classes,
                           seed=client_seed(s.seed, k)) for k, name in
              enumerate(config.client_models)]
    server = seeded_model(s.server_model, input_shape=shape, num_classes=classes,
                          seed=client_seed(s.seed, 999))
    aggregation = config.aggregation
    channels = [AggregationChannel(s.aggregator, s.clients, clip=clip,
                                   ring_bits=aggregation.ring_bits, expected_dropout=0.0,
                                   purpose=purpose)
                for clip, purpose in ((aggregation.grad_clip, "dream-gradient"),
                                      (aggregation.label_clip, "soft-label"))]
    fed = CoDreamFederation(clients, models, server, torch.from_numpy(data.x_test),
                            torch.from_numpy(data.y_test), codream=config.codream, seed=s.seed,
                            grad_channel=channels[0], label_channel=channels[1],
                            device=torch.device("cpu"))
    fed.warm_up()
    for r in range(1, s.rounds + 1):
        record = fed.run_round(r)
        if progress:
            progress.log(f"leakage (a): CoDream round {r}, test accuracy {record.test}")
    return fed.buffer.tensors()[0], fed.rounds[-1].test


def prepare(s: DreamsSettings, progress=None) -> DreamData:
    """Split digits, run CoDream, train the outside feature model; everything in [0, 1]."""
    data = load_dataset("digits", seed=s.seed)
    everything = np.arange(len(data.y_train))
    pool, feature_split = split_validation(everything, data.y_train,
                                           fraction=s.feature_fraction, seed=s.seed)
    dreams, accuracy = _run_codream(s, data, pool, feature_split, progress)
    feature_model = seeded_model(s.feature_model, input_shape=data.input_shape,
                                 num_classes=data.num_classes, seed=client_seed(s.seed, 777))
    train_local(feature_model, torch.from_numpy(data.x_train[feature_split]),
                torch.from_numpy(data.y_train[feature_split]), epochs=s.feature_epochs,
                lr=0.05, generator=seeded_generator(s.seed, "feature-model"))
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    heldout = data.x_test
    if s.max_reference is not None and s.max_reference < len(heldout):
        pick = np.random.default_rng(s.seed).choice(len(heldout), s.max_reference, replace=False)
        heldout = heldout[np.sort(pick)]

    def unit(x: np.ndarray) -> np.ndarray:
        return to_unit_pixels(x, data.mean, data.std)

    return DreamData(unit(dreams.numpy()), unit(data.x_train[pool]), unit(heldout),
                     unit(data.x_train[feature_split]),
                     embedder(feature_model, data.mean, data.std),
                     evaluate(feature_model, x_test, y_test), accuracy)


def similarity_table(queries: np.ndarray, train: np.ndarray, heldout: np.ndarray,
                     embed: Callable[[np.ndarray], np.ndarray], *, subsamples: int,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-query nearest-neighbour similarities, shape (Q,) each.

    `<metric>_train`: mean over `subsamples` random subsets of `train` of held-out size;
    `<metric>_heldout`: to the held-out set; `<metric>_train_full`: to the whole train union
    (copy detection). PSNR keeps inf here; cap it before averaging.
    """
    size = len(heldout)
    if size > len(train):
        raise ValueError(f"held-out set ({size}) is larger than the train union ({len(train)})")
    fq, ft, fh = embed(queries), embed(train), embed(heldout)
    sims: dict[str, tuple] = {
        "psnr": (psnr_matrix, queries, train, heldout),
        "ssim": (ssim_matrix, queries, train, heldout),
        "cosine": (cosine_matrix, fq, ft, fh),
    }
    table = {}
    for name, (fn, q, t, h) in sims.items():
        full = fn(q, t)
        table[f"{name}_train_full"] = full.max(axis=1)
        per = subsampled_nearest(full, size=size, repeats=subsamples, rng=rng)
        table[f"{name}_train"] = (cap_psnr(per) if name == "psnr" else per).mean(axis=0)
        table[f"{name}_heldout"] = fn(q, h).max(axis=1)
    return table


def gap_rows(table: dict[str, np.ndarray], label: str, *, resamples: int,
             rng: np.random.Generator) -> list[dict]:
    """One row per metric: mean similarity to train and held-out, the gap and its 95% CI."""
    rows = []
    for name in METRICS:
        train, held = table[f"{name}_train"], table[f"{name}_heldout"]
        if name == "psnr":
            held = cap_psnr(held)
        diff = train - held
        lo, hi = bootstrap_mean_ci(diff, resamples=resamples, rng=rng)
        rows.append({"set": label, "metric": name, "n": len(diff),
                     "mean_train": float(train.mean()), "mean_heldout": float(held.mean()),
                     "gap": float(diff.mean()), "ci95_low": lo, "ci95_high": hi,
                     "max_train_full": float(table[f"{name}_train_full"].max()),
                     "exact_copies": int(np.isinf(table["psnr_train_full"]).sum())})
    return rows


def _histograms(table: dict[str, np.ndarray], out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, name in zip(axes, METRICS, strict=True):
        train, held = table[f"{name}_train"], table[f"{name}_heldout"]
        held = cap_psnr(held) if name == "psnr" else held
        bins = np.histogram_bin_edges(np.concatenate([train, held]), bins=30)
        ax.hist(train, bins=bins, alpha=0.6, label="train union (equal-size subsets)")
        ax.hist(held, bins=bins, alpha=0.6, label="held-out")
        ax.set_xlabel(f"nearest-neighbour {name}" + (" (dB, capped)" if name == "psnr" else ""))
    axes[0].set_ylabel("dreams")
    axes[0].legend(fontsize=7)
    return save_figure(fig, out_dir, "leakage_dreams_hist.png")


def _neighbours(dd: DreamData, table: dict[str, np.ndarray], out_dir: Path, k: int = 8) -> str:
    import matplotlib.pyplot as plt

    top = np.argsort(-table["ssim_train_full"])[:k]
    near_t = ssim_matrix(dd.dreams[top], dd.train).argmax(axis=1)
    near_h = ssim_matrix(dd.dreams[top], dd.heldout).argmax(axis=1)
    fig, axes = plt.subplots(3, len(top), figsize=(1.2 * len(top), 4), squeeze=False)
    for col, (i, t, h) in enumerate(zip(top, near_t, near_h, strict=True)):
        for row, img in enumerate((dd.dreams[i], dd.train[t], dd.heldout[h])):
            axes[row][col].imshow(img.transpose(1, 2, 0).squeeze(), cmap="gray", vmin=0, vmax=1)
            axes[row][col].axis("off")
    for row, label in enumerate(("dream", "nearest train", "nearest held-out")):
        axes[row][0].set_title(label, fontsize=7, loc="left")
    return save_figure(fig, out_dir, "leakage_dreams_neighbours.png")


def run(settings: DreamsSettings, out_dir: Path, progress=None) -> SectionResult:
    """Section (a): released dreams vs training union vs held-out, with bootstrap gaps."""
    start = time.perf_counter()
    with torch_threads(settings.threads):
        dd = prepare(settings, progress)
    rng = np.random.default_rng(settings.seed)
    table = similarity_table(dd.dreams, dd.train, dd.heldout, dd.embed,
                             subsamples=settings.subsamples, rng=rng)
    n_control = min(len(dd.dreams), len(dd.unseen), len(dd.train))
    controls = {"control: unseen real digits": dd.unseen[rng.choice(len(dd.unseen), n_control,
                                                                    replace=False)],
                "control: training images": dd.train[rng.choice(len(dd.train), n_control,
                                                                 replace=False)]}
    rows = gap_rows(table, "dreams", resamples=settings.bootstrap, rng=rng)
    for label, queries in controls.items():
        control = similarity_table(queries, dd.train, dd.heldout, dd.embed,
                                   subsamples=settings.subsamples, rng=rng)
        rows += gap_rows(control, label, resamples=settings.bootstrap, rng=rng)
    out_dir = Path(out_dir)
    figures = [_histograms(table, out_dir), _neighbours(dd, table, out_dir)]
    window = ssim_window(*dd.dreams.shape[2:])
    summary = {"dreams": len(dd.dreams), "train_union": len(dd.train),
               "reference_size": len(dd.heldout), "subsamples": settings.subsamples,
               "bootstrap_resamples": settings.bootstrap, "psnr_cap_db": PSNR_CAP_DB,
               "ssim_window": {"size": window[0], "sigma": window[1]},
               "exact_copies": int(np.isinf(table["psnr_train_full"]).sum()),
               "feature_model_test_accuracy": dd.feature_accuracy,
               "client_test_accuracy": dd.client_accuracy}
    for row in rows[:3]:
        summary[f"{row['metric']}_gap"] = row["gap"]
        summary[f"{row['metric']}_gap_ci95"] = [row["ci95_low"], row["ci95_high"]]
    per_dream = [{k: float(v[i]) for k, v in table.items()} for i in range(len(dd.dreams))]
    notes = [
        "Dreams live in normalised input space; they are mapped back (x * std + mean) and "
        "clipped into [0, 1], the pixel space of every comparison.",
        f"Equal-size references: the train union ({len(dd.train)}) is subsampled to the held-out "
        f"size ({len(dd.heldout)}) {settings.subsamples} times and each dream's best similarity "
        "is averaged over the subsamples; *_train_full is the whole union (copy detection).",
        f"PSNR: identical images are inf in the raw arrays; means, gaps and CIs use "
        f"min(PSNR, {PSNR_CAP_DB:g} dB) so copies raise the gap instead of vanishing.",
        f"SSIM: Gaussian window {window[0]}x{window[0]}, sigma {window[1]:.2f}, K1=0.01, "
        "K2=0.03, data range 1, valid positions only.",
        f"Cosine: penultimate features of a {settings.feature_model} trained only on a disjoint "
        f"{settings.feature_fraction:.0%} of the train split (test accuracy "
        f"{dd.feature_accuracy:.3f}); neither reference set trained it.",
        f"CI: percentile bootstrap over dreams, 95%, B = {settings.bootstrap}; the gap is "
        "paired per dream (train minus held-out). Chance is a gap of 0 (the unseen-digits "
        "control measures it); the training-images control shows what memorisation looks like.",
    ]
    return SectionResult("leakage_dreams", "Leakage (a): released dreams vs private data",
                         summary, rows, {"per_dream": per_dream,
                                         "released_dreams": dd.dreams.reshape(len(dd.dreams),
                                                                              -1)},
                         figures, notes, time.perf_counter() - start)

