"""Leakage (b): what the server reconstructs of each client from what the aggregator shows it.

Clients hold Dirichlet(alpha) label-skewed digits. The server attacks from its view only: per
client (plain aggregation) it runs a DeepInversion driven by that client's gradient alone on a
batch of its own, then reads the label histogram from the client's soft labels and the mean image
from the dreams. Under secure aggregation it sees the sum at the common point only. Scores
compare the estimates with each client's own data against the other clients' (`score`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from codream_secure.audit.leakage.dreams_vs_data import torch_threads
from codream_secure.audit.leakage.metrics import (
    histogram_from_probabilities,
    ssim_matrix,
    subsampled_nearest,
    to_unit_pixels,
    total_variation_distance,
)
from codream_secure.audit.reporting import SectionResult, save_figure
from codream_secure.baselines import client_seed, seeded_model
from codream_secure.data import LoadedDataset, load_dataset, partition
from codream_secure.distill import soft_labels, train_local
from codream_secure.dreams import DreamLossWeights, DreamSynthesizer, dream_gradient
from codream_secure.errors import ConfigError
from codream_secure.federation import AggregationChannel, generator
from codream_secure.privacy import INTEGER_ORDERS, PrivacyLedger
from protocols import registry
from protocols.dp.mechanisms import DPSpec

__all__ = ["DEFAULT", "FULL", "MODES", "TINY", "Estimates", "ReconstructionSettings",
           "ServerView", "Truth", "attack", "dp_spec", "estimate", "make_truth", "open_channel",
           "run", "score", "summarise"]

MODES = ("plain-active", "plain-passive", "secagg", "plain-active+dp", "secagg+dp",
         "secagg+collude")
GRAD_CLIP, LABEL_CLIP, RING_BITS = 8.0, 1.0, 32  # the simulation's codec defaults
DP_DELTA = 1e-5


@dataclass(frozen=True)
class ReconstructionSettings:
    """Client counts, the clients' training, the attack's dream optimisation and DP noise."""

    client_counts: tuple[int, ...] = (2, 4, 8)
    models: tuple[str, ...] = ("smallcnn",)
    alpha: float = 0.1
    warmup_epochs: int = 10
    local_lr: float = 0.05
    dream_batch: int = 64
    dream_steps: int = 100
    dream_lr: float = 0.05
    modes: tuple[str, ...] = MODES
    secure_aggregator: str = "secagg"
    dp_noise_multiplier: float = 1.0
    dp_grad_clip: float = 1.0
    subsamples: int = 3
    threads: int = 1  # torch intra-op threads (see dreams_vs_data.torch_threads)
    seed: int = 0


TINY = ReconstructionSettings(client_counts=(2, 3), warmup_epochs=1, dream_batch=8,
                              dream_steps=3, subsamples=1)
DEFAULT = ReconstructionSettings()
FULL = ReconstructionSettings(client_counts=(2, 4, 8, 16), models=("smallcnn", "resnet8",
                                                                    "wrn16_1"),
                              warmup_epochs=20, dream_steps=500, subsamples=10)


@dataclass
class Truth:
    """The clients' private side: models, data (normalised), histograms, mean images in [0, 1]."""

    models: list[torch.nn.Module]
    x: list[np.ndarray]
    histograms: np.ndarray
    mean_images: np.ndarray
    images01: list[np.ndarray]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class ServerView:
    """What the server holds after the attack: its own dream batches and the soft labels it got.

    `targets[i]` is the client entry i speaks for, or None for an aggregate (the sum at the
    common point, which speaks for nobody in particular).
    """

    mode: str
    n: int
    dreams: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    targets: list[int | None] = field(default_factory=list)
    queries: int = 0
    noise_std: float = 0.0
    label_noise_std: float = 0.0


@dataclass
class Estimates:
    """Per attacked client: estimated label histogram, mean image and dreams (all in [0, 1])."""

    clients: list[int]
    histograms: np.ndarray
    mean_images: np.ndarray
    dreams01: list[np.ndarray]


def make_truth(s: ReconstructionSettings, n: int, data: LoadedDataset | None = None) -> Truth:
    """Partition digits among n clients (Dirichlet) and train each client's model locally."""
    data = data or load_dataset("digits", seed=s.seed)
    parts = partition(data.y_train, n, scheme="dirichlet", alpha=s.alpha, seed=s.seed + n)
    models = []
    for k, idx in enumerate(parts):
        model = seeded_model(s.models[k % len(s.models)], input_shape=data.input_shape,
                             num_classes=data.num_classes, seed=client_seed(s.seed, k))
        train_local(model, torch.from_numpy(data.x_train[idx]),
                    torch.from_numpy(data.y_train[idx]), epochs=s.warmup_epochs, lr=s.local_lr,
                    generator=generator(s.seed, "leakage-b", n, k))
        models.append(model)
    images = [to_unit_pixels(data.x_train[idx], data.mean, data.std) for idx in parts]
    hist = np.stack([np.bincount(data.y_train[idx], minlength=data.num_classes) for idx in parts])
    return Truth(models, [data.x_train[idx] for idx in parts], hist,
                 np.stack([im.mean(axis=0) for im in images]), images, data.mean, data.std)


def dp_spec(s: ReconstructionSettings, protocol: str, n: int, clip: float) -> DPSpec:
    """The toolkit's distributed client-level DP (Skellam), sized as `simulate --dp client` does.

    Each client clips to L2 norm `clip` and adds noise of variance (z clip)^2 / t, t the fewest
    vectors one release can hold: 1 under plain (each vector is seen alone: local DP), the SecAgg
    threshold + 1 under secure aggregation.
    """
    t = registry.get(protocol).plan(n, expected_dropout=0.0, private=True).min_contributors
    return DPSpec(mode="distributed", noise_multiplier=s.dp_noise_multiplier, l2_clip=clip,
                  noise="skellam", min_contributors=t)


def open_channel(protocol: str, n: int, *, clip: float, length: int, seed: tuple,
                 dp: DPSpec | None) -> AggregationChannel:
    """A CoDream aggregation channel, opened: what it returns is what the server sees."""
    channel = AggregationChannel(protocol, n, clip=clip, ring_bits=RING_BITS,
                                 expected_dropout=0.0, dp=dp)
    channel.open(length, seed=seed)
    return channel


def _gradient(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    return dream_gradient(model, x, DreamLossWeights()).numpy().reshape(-1)


def _labels(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    return soft_labels(model, x, kind="probs").numpy().reshape(-1)


def _step(synth: DreamSynthesizer, gradient: np.ndarray) -> None:
    synth.step(torch.from_numpy(gradient.astype(np.float32)).reshape(synth.shape))


def attack(s: ReconstructionSettings, truth: Truth, mode: str) -> ServerView:
    """Run one server strategy against the clients; return only what the server saw.

    Every vector reaches the server through an AggregationChannel of the mode's aggregator (with
    the toolkit's DP when the mode ends in +dp); under plain a client's vector is sent alone,
    which is exactly what a plain server receives from it.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown attack mode {mode!r}; choose from {', '.join(MODES)}")
    n, models = len(truth.models), truth.models
    if mode == "secagg+collude" and n != 2:
        raise ConfigError("secagg+collude is defined for n = 2 (the sum minus one input)")
    protocol = s.secure_aggregator if mode.startswith("secagg") else "plain"
    shape = (s.dream_batch, *truth.x[0].shape[1:])
    classes = truth.histograms.shape[1]
    dp = mode.endswith("+dp")
    specs = {"grad": dp_spec(s, protocol, n, s.dp_grad_clip) if dp else None,
             "label": dp_spec(s, protocol, n, float(np.sqrt(s.dream_batch))) if dp else None}

    def channel(kind: str, *tag: object) -> AggregationChannel:
        clip, length = ((GRAD_CLIP, int(np.prod(shape))) if kind == "grad"
                        else (LABEL_CLIP, s.dream_batch * classes))
        return open_channel(protocol, n, clip=clip, length=length, dp=specs[kind],
                            seed=(s.seed, "leakage-b", mode, n, kind, *tag))

    view = ServerView(mode, n, queries=n * (s.dream_steps + 1))
    if dp:  # the noise in one release: one vector under plain, the sum of n under SecAgg
        share = n if registry.get(protocol).masks_inputs else 1
        view.noise_std, view.label_noise_std = (
            spec.central_sigma * np.sqrt(share / (spec.min_contributors or 1))
            for spec in (specs["grad"], specs["label"]))
    if mode.startswith("plain-active"):
        for k, model in enumerate(models):  # a batch of the server's own for each client
            grads, labels = channel("grad", k), channel("label", k)
            synth = DreamSynthesizer(shape, generator=generator(s.seed, "attack", n, k),
                                     lr=s.dream_lr)
            for _ in range(s.dream_steps):
                _step(synth, grads.sum({k: _gradient(model, synth.dreams)})[0])
            x = synth.dreams
            seen, _ = labels.sum({k: _labels(model, x)})
            view.dreams.append(x.numpy())
            view.labels.append(seen.reshape(s.dream_batch, classes))
            view.targets.append(k)
        return view
    if mode == "secagg+collude":
        return _collude(s, models, shape, channel, view)
    grads = channel("grad")  # one common batch, as the honest protocol runs it
    synth = DreamSynthesizer(shape, generator=generator(s.seed, "attack", n, "joint"),
                             lr=s.dream_lr)
    for _ in range(s.dream_steps):
        x = synth.dreams
        total, _ = grads.sum({k: _gradient(m, x) for k, m in enumerate(models)})
        _step(synth, total / n)
    x = synth.dreams
    answers = {k: _labels(m, x) for k, m in enumerate(models)}
    if not registry.get(protocol).masks_inputs:  # each client's soft labels arrive in the clear
        for k in range(n):
            seen, _ = channel("label", k).sum({k: answers[k]})
            view.dreams.append(x.numpy())
            view.labels.append(seen.reshape(s.dream_batch, classes))
            view.targets.append(k)
    else:
        total, _ = channel("label").sum(answers)
        view.dreams, view.targets = [x.numpy()], [None]
        view.labels = [total.reshape(s.dream_batch, classes) / n]
    return view


def _collude(s: ReconstructionSettings, models: list[torch.nn.Module], shape: tuple, channel,
             view: ServerView) -> ServerView:
    """n = 2 under SecAgg, server + client 0: sum minus client 0's input is client 1's input."""
    grads, labels = channel("grad"), channel("label")
    synth = DreamSynthesizer(shape, generator=generator(s.seed, "attack", 2, 1), lr=s.dream_lr)
    for _ in range(s.dream_steps):  # the server sends client 1's private batch to both
        x = synth.dreams
        own = _gradient(models[0], x)
        total, _ = grads.sum({0: own, 1: _gradient(models[1], x)})
        _step(synth, total - own)
    x = synth.dreams
    own = _labels(models[0], x)
    total, _ = labels.sum({0: own, 1: _labels(models[1], x)})
    view.dreams, view.targets = [x.numpy()], [1]
    view.labels = [(total - own).reshape(s.dream_batch, -1)]
    return view


def estimate(view: ServerView, mean: tuple[float, ...], std: tuple[float, ...]) -> Estimates:
    """The server's per-client estimates from its view alone (an aggregate speaks for all)."""
    clients, hists, means, dreams = [], [], [], []
    for x, labels, target in zip(view.dreams, view.labels, view.targets, strict=True):
        x01 = to_unit_pixels(x, mean, std)
        for k in range(view.n) if target is None else [target]:
            clients.append(k)
            hists.append(histogram_from_probabilities(labels))
            means.append(x01.mean(axis=0))
            dreams.append(x01)
    return Estimates(clients, np.stack(hists), np.stack(means), dreams)


def score(est: Estimates, truth: Truth, *, subsamples: int, rng: np.random.Generator
          ) -> list[dict]:
    """Per attacked client: estimate vs its own data and vs the other clients' data.

    Attribution asks whether the estimate is closest to its own client's truth among all n
    (chance 1/n); for any estimate that does not depend on k, the own-vs-others gaps of the TV
    and mean-image scores average to exactly 0 over clients. The NN-SSIM gap has no such
    identity (own sets are small and class-skewed, the others' large and varied), so `run`
    sets its chance level to the gap of the client-independent secagg reconstruction.
    """
    n = len(truth.images01)
    rows = []
    for k, hist, mean_img, dreams in zip(est.clients, est.histograms, est.mean_images,
                                         est.dreams01, strict=True):
        others = [j for j in range(n) if j != k]
        tv = np.array([total_variation_distance(hist, truth.histograms[j]) for j in range(n)])
        rmse = np.sqrt(((truth.mean_images - mean_img) ** 2).reshape(n, -1).mean(axis=1))
        own_imgs = truth.images01[k]
        other_imgs = np.concatenate([truth.images01[j] for j in others])
        size = min(len(own_imgs), len(other_imgs))  # equal-size references
        nn_own, nn_other = (subsampled_nearest(ssim_matrix(dreams, ref), size=size,
                                               repeats=subsamples, rng=rng).mean()
                            for ref in (own_imgs, other_imgs))
        rows.append({"client": k, "samples": len(own_imgs),
                     "label_tv_own": float(tv[k]), "label_tv_others": float(tv[others].mean()),
                     "label_attributed": bool(np.argmin(tv) == k),
                     "mean_image_rmse_own": float(rmse[k]),
                     "mean_image_rmse_others": float(rmse[others].mean()),
                     "mean_image_attributed": bool(np.argmin(rmse) == k),
                     "nn_ssim_own": float(nn_own), "nn_ssim_others": float(nn_other)})
    return rows


def summarise(rows: list[dict], *, n: int, mode: str) -> dict:
    """One table row: scores averaged over the attacked clients, each beside its chance level."""
    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    return {"n": n, "mode": mode, "clients_attacked": len(rows),
            "label_attribution": mean("label_attributed"), "attribution_chance": 1.0 / n,
            "label_tv_own": mean("label_tv_own"), "label_tv_others": mean("label_tv_others"),
            "label_tv_gap": mean("label_tv_others") - mean("label_tv_own"),
            "mean_image_attribution": mean("mean_image_attributed"),
            "mean_image_rmse_gap": mean("mean_image_rmse_others") - mean("mean_image_rmse_own"),
            "tv_and_rmse_gap_chance": 0.0,
            "nn_ssim_gap": mean("nn_ssim_own") - mean("nn_ssim_others"),
            "nn_ssim_gap_chance": math.nan}


def _plot(table: list[dict], out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("label_attribution", "label-histogram attribution"),
            ("mean_image_attribution", "mean-image attribution"),
            ("label_tv_gap", "TV gap (others - own)"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    counts = sorted({r["n"] for r in table})
    for ax, (key, label) in zip(axes, keys, strict=True):
        for mode in dict.fromkeys(r["mode"] for r in table):
            pts = [(r["n"], r[key]) for r in table if r["mode"] == mode]
            ax.plot(*zip(*pts, strict=True), marker="o", label=mode)
        chance = [1.0 / c for c in counts] if "attribution" in key else [0.0] * len(counts)
        ax.plot(counts, chance, "k--", label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("clients n")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    return save_figure(fig, out_dir, "leakage_reconstruction.png")


def run(settings: ReconstructionSettings, out_dir: Path, progress=None) -> SectionResult:
    """Section (b): every mode against every client count; rows per (n, mode) and per client."""
    start = time.perf_counter()
    for mode in settings.modes:
        if mode not in MODES:
            raise ConfigError(f"unknown attack mode {mode!r}; choose from {', '.join(MODES)}")
    rng = np.random.default_rng(settings.seed)
    table, per_client, views = [], [], []
    data = load_dataset("digits", seed=settings.seed)
    for n in settings.client_counts:
        with torch_threads(settings.threads):
            truth = make_truth(settings, n, data)
        for mode in settings.modes:
            if mode == "secagg+collude" and n != 2:
                continue
            with torch_threads(settings.threads):
                view = attack(settings, truth, mode)
            rows = score(estimate(view, truth.mean, truth.std), truth,
                         subsamples=settings.subsamples, rng=rng)
            table.append(summarise(rows, n=n, mode=mode))
            per_client += [{"n": n, "mode": mode, **r} for r in rows]
            views.append({"n": n, "mode": mode, "queries": view.queries,
                          "gradient_noise_std": view.noise_std,
                          "label_noise_std": view.label_noise_std,
                          "epsilon_nominal": _epsilon(settings, n) if "+dp" in mode else None,
                          "view_entries": len(view.targets),
                          "targets": [-1 if t is None else t for t in view.targets]})
            if progress:
                progress.log(f"leakage (b): n={n} {mode}: label attribution "
                             f"{table[-1]['label_attribution']:.2f} (chance {1 / n:.2f})")
        _set_nn_chance([r for r in table if r["n"] == n])
    summary = {f"{r['mode']}_n{r['n']}_label_attribution": r["label_attribution"]
               for r in table}
    return SectionResult("leakage_reconstruction",
                         "Leakage (b): what the server reconstructs per client", summary, table,
                         {"per_client": per_client, "server_views": views},
                         [_plot(table, Path(out_dir))], _notes(settings),
                         time.perf_counter() - start)


def _set_nn_chance(rows: list[dict]) -> None:
    """NN-SSIM chance at one n: the gap of the secagg aggregate, which depends on no client."""
    aggregate = [r["nn_ssim_gap"] for r in rows if r["mode"] == "secagg"]
    for r in rows:
        r["nn_ssim_gap_chance"] = aggregate[0] if aggregate else math.nan


def _epsilon(s: ReconstructionSettings, n: int) -> float:
    """Client-level epsilon (RDP, delta 1e-5) of one attack's releases at the nominal z.

    Every client takes part in dream_steps gradient releases and one soft-label release (q = 1).
    The accounting multiplier of the fixed-point grid is within 1e-3 of z here (docs/privacy.md).
    """
    ledger = PrivacyLedger(unit="client", mechanism="skellam", mode="distributed",
                           noise_multiplier=s.dp_noise_multiplier, l2_clip=s.dp_grad_clip,
                           delta=DP_DELTA, n_samples=n, orders=INTEGER_ORDERS)
    ledger.record(s.dream_steps + 1)
    return ledger.epsilon()  # the ledger records (not prints) an optimum at the smallest order


def _notes(s: ReconstructionSettings) -> list[str]:
    return [
        "plain-active: the server gives each client a dream batch of its own (under plain "
        "aggregation a client cannot tell) and runs a DeepInversion on that client's gradient "
        f"alone ({s.dream_steps} Adam steps, lr {s.dream_lr}); histogram = mean of the client's "
        "soft labels on those dreams, mean image = mean of the dreams in [0, 1].",
        "plain-passive: the honest protocol (one common batch); the server still sees each "
        "client's soft labels, so its histogram estimate is per client, its dreams are not.",
        f"secagg ({s.secure_aggregator}): only the sum at the common point; the one aggregate "
        "estimate is every client's estimate. Attribution chance is 1/n; the TV and mean-image "
        "gaps of any client-independent estimate are 0 on average; NN-SSIM gap chance ~0.",
        "+dp: the toolkit's client-level distributed DP (protocols.dp Skellam noise through the "
        f"channel, as simulate --dp client): each client clips to L2 norm C (C = "
        f"{s.dp_grad_clip} for gradients, sqrt(batch) for soft labels) and adds noise of "
        f"variance (z C)^2 / t, z = {s.dp_noise_multiplier}; t = 1 under plain (each vector is "
        "seen alone: local DP), the SecAgg threshold + 1 under secure aggregation. "
        "server_views.epsilon_nominal is the client-level epsilon of one attack (RDP, delta "
        f"{DP_DELTA:g}).",
        "secagg+collude (n = 2 only): the server colludes with client 0, sends client 1's "
        "private batch to both, and subtracts client 0's input from the secure sum: with two "
        "clients the sum and one input give the other input exactly, so it scores like "
        "plain-active on client 1.",
        "Scores: label TV distance to own vs mean over others' true histograms; mean-image RMSE; "
        "nearest-neighbour SSIM of the dreams to own vs others' images, both subsampled to one "
        f"size ({s.subsamples} draws). Dirichlet alpha = {s.alpha}; one seed ({s.seed}).",
        "Chance: attribution 1/n; TV and RMSE gaps 0 (exact for any client-independent "
        "estimate); NN-SSIM gap: measured, the gap of the secagg aggregate at the same n "
        "(nn_ssim_gap_chance; NaN without a secagg row), since small skewed own sets make it "
        "non-zero for client-independent dreams too.",
    ]
