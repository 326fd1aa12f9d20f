"""Leakage (c): LiRA membership inference on the final models of CoDream, isolated and FedAvg.

The game (Carlini et al. 2022, "Membership inference attacks from first principles"): a
population of candidate points; each *world* draws a random half of it as the federation's data
and splits that half among the clients. Target worlds give the attacked models; reference worlds
(each point IN in exactly half of them) give, per point, models that trained on it (IN) and
models whose world never held it (OUT). The attacker sees a target model's logits on every
candidate; the ground truth is which points that model's client trained on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from codream_secure.audit.leakage import mia_metrics as mm
from codream_secure.audit.reporting import SectionResult, save_figure
from codream_secure.baselines import (
    MOMENTUM,
    WEIGHT_DECAY,
    client_seed,
    load_flat_state,
    run_fedavg,
    seeded_model,
    weighted_mean,
)
from codream_secure.config import CoDreamConfig
from codream_secure.data import load_dataset
from codream_secure.distill import evaluate, train_local
from codream_secure.errors import ConfigError
from codream_secure.federation import AggregationChannel, CoDreamFederation
from codream_secure.results import ClientData

ATTACKS = ("lira-online", "lira-offline", "confidence")
METHODS = ("isolated", "fedavg", "codream")


@dataclass(frozen=True)
class DPSGD:
    """Sample-level DP-SGD (codream_secure.sample_dp: Opacus, Poisson sampling, RDP accountant)
    on the isolated recipe; targets and their reference models are both trained this way."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    batch_size: int = 32
    lr: float = 0.1
    epochs: int = 20


@dataclass(frozen=True)
class MembershipSettings:
    """Population, recipes (shared by targets and references), and the size of the game."""

    dataset: str = "digits"
    population: int | None = None  # candidate points drawn from the train split (None: all)
    clients: int = 4
    model: str = "smallcnn"
    warmup_epochs: int = 20
    rounds: int = 3
    local_epochs: int = 2
    lr: float = 0.05
    batch_size: int = 64
    dream_steps: int = 50
    dream_batch: int = 64
    distill_epochs: int = 5
    aggregator: str = "secagg"  # of the CoDream targets; references use "plain" (same sums)
    methods: tuple[str, ...] = METHODS
    target_worlds: int = 2
    reference_worlds: int = 16  # even: every point is IN in exactly half of them
    codream_references: str = "isolated"  # "isolated" (mismatched, cheap) or "codream"
    global_std: bool = False
    delta: float = 1e-5
    confidence: float = 0.95
    dp: DPSGD | None = None  # adds the method "isolated+dp-sgd"
    seed: int = 0
    threads: int = 1  # tiny models: one thread avoids OpenMP spinning on a shared machine


TINY = MembershipSettings(population=160, clients=2, warmup_epochs=2, rounds=1,
                          local_epochs=1, dream_steps=2, dream_batch=16, distill_epochs=1,
                          target_worlds=1, reference_worlds=2)
DEFAULT = MembershipSettings()
FULL = MembershipSettings(target_worlds=4, reference_worlds=64, codream_references="codream",
                          dp=DPSGD(noise_multiplier=1.0))


@dataclass
class _Models:
    """φ of every candidate on each model of one recipe, and who trained on what."""

    phi: list[np.ndarray] = field(default_factory=list)
    member: list[np.ndarray] = field(default_factory=list)  # this model's own training points
    in_world: list[np.ndarray] = field(default_factory=list)  # its federation held the point
    test_acc: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    epsilon: float | None = None  # the DP accountant's, when trained with DP-SGD


def _check(s: MembershipSettings) -> None:
    bad = set(s.methods) - set(METHODS)
    if bad:
        raise ConfigError(f"unknown methods {sorted(bad)}; choose from {METHODS}")
    if s.reference_worlds < 2 or s.reference_worlds % 2:
        raise ConfigError(f"reference_worlds must be even and >= 2, got {s.reference_worlds}")
    if s.target_worlds < 1 or s.clients < 2:
        raise ConfigError("need target_worlds >= 1 and clients >= 2")
    if s.codream_references not in ("isolated", "codream"):
        raise ConfigError(f"codream_references must be isolated|codream, not "
                          f"{s.codream_references!r}")


def _balanced_worlds(n_points: int, worlds: int, rng: np.random.Generator) -> np.ndarray:
    """worlds x n_points membership; each point is in exactly half of the worlds."""
    keys = rng.random((worlds, n_points))
    rank = keys.argsort(axis=0).argsort(axis=0)
    return rank < worlds // 2


def _split(members: np.ndarray, clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(p) for p in np.array_split(rng.permutation(np.flatnonzero(members)), clients)]


class _Game:
    """Population tensors and the recipes that train a world's models."""

    def __init__(self, s: MembershipSettings) -> None:
        data = load_dataset(s.dataset, max_train=s.population, seed=s.seed)
        self.s, self.data = s, data
        self.x, self.y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
        self.x_test, self.y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
        # the recipes' own per-round evaluations select nothing here (final models are
        # attacked), so they get a token set; accuracy is measured on the full test set
        self.x_probe, self.y_probe = self.x_test[:16], self.y_test[:16]
        self.n = len(self.y)

    def _model(self, seed: int) -> torch.nn.Module:
        return seeded_model(self.s.model, input_shape=self.data.input_shape,
                            num_classes=self.data.num_classes, seed=seed)

    def _record(self, out: _Models, model: torch.nn.Module, own: np.ndarray,
                world: np.ndarray) -> None:
        model.eval()
        with torch.no_grad():
            logits = model(self.x).numpy()
        member = np.zeros(self.n, bool)
        member[own] = True
        out.phi.append(mm.logit_confidence(logits, self.data.y_train))
        out.member.append(member)
        out.in_world.append(world)
        out.test_acc.append(evaluate(model, self.x_test, self.y_test))
        out.train_acc.append(float((logits[own].argmax(1) == self.data.y_train[own]).mean()))

    def _clients(self, parts: list[np.ndarray]) -> list[ClientData]:
        return [ClientData(self.x[p], self.y[p], self.x_probe, self.y_probe) for p in parts]

    def train(self, recipe: str, parts: list[np.ndarray], world_seed: int, out: _Models,
              aggregator: str = "plain") -> None:
        """Train one world's models by `recipe` and record them into `out`."""
        s, world = self.s, np.zeros(self.n, bool)
        world[np.concatenate(parts)] = True
        if recipe == "isolated":
            for k, part in enumerate(parts):
                net = self._model(client_seed(world_seed, k))
                gen = torch.Generator().manual_seed(client_seed(world_seed, k))
                for epochs in [s.warmup_epochs] + [s.local_epochs] * s.rounds:
                    train_local(net, self.x[part], self.y[part], epochs=epochs, lr=s.lr,
                                momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                batch_size=s.batch_size, generator=gen)
                self._record(out, net, part, world)
        elif recipe == "fedavg":
            final: list[np.ndarray] = []

            def keep_last(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
                final[:] = [weighted_mean(vectors, weights)]
                return final[0]

            run_fedavg(self._clients(parts), self.x_probe, self.y_probe, model=s.model,
                       input_shape=self.data.input_shape, num_classes=self.data.num_classes,
                       warmup_epochs=s.warmup_epochs, rounds=s.rounds,
                       local_epochs=s.local_epochs, lr=s.lr, batch_size=s.batch_size,
                       seed=world_seed, aggregate=keep_last)
            net = self._model(client_seed(world_seed, 0))
            load_flat_state(net, final[0])
            self._record(out, net, np.flatnonzero(world), world)
        elif recipe == "codream":
            for net, part in zip(self._codream(parts, world_seed, aggregator), parts, strict=True):
                self._record(out, net, part, world)
        elif recipe == "isolated+dp-sgd":
            assert s.dp is not None
            for k, part in enumerate(parts):
                net, out.epsilon = _dp_sgd(self._model(client_seed(world_seed, k)),
                                           self.x[part], self.y[part], s.dp,
                                           client_seed(world_seed, k))
                self._record(out, net, part, world)
        else:
            raise ConfigError(f"unknown recipe {recipe!r}")

    def _codream(self, parts: list[np.ndarray], world_seed: int, aggregator: str
                 ) -> list[torch.nn.Module]:
        s = self.s
        codream = CoDreamConfig(
            rounds=s.rounds, warmup_epochs=s.warmup_epochs, local_epochs=s.local_epochs,
            local_lr=s.lr, batch_size=s.batch_size, dream_batch=s.dream_batch,
            dream_steps=s.dream_steps, dream_lr=0.05, distill_epochs=s.distill_epochs,
            distill_lr=0.05, kd_temperature=20.0, buffer_size=10 * s.dream_batch,
            soft_labels="probs", adaptive_after=s.rounds, adaptive_weight=10.0)
        channels = [AggregationChannel(aggregator, len(parts), clip=clip, ring_bits=32,
                                       expected_dropout=0.0, purpose=purpose)
                    for clip, purpose in ((8.0, "dream-gradient"), (1.0, "soft-label"))]
        models = [self._model(client_seed(world_seed, k)) for k in range(len(parts))]
        fed = CoDreamFederation(self._clients(parts), models, self._model(world_seed * 1000 + 999),
                                self.x_probe, self.y_probe, codream=codream, seed=world_seed,
                                grad_channel=channels[0], label_channel=channels[1],
                                device=torch.device("cpu"))
        fed.warm_up()
        for r in range(1, s.rounds + 1):
            fed.run_round(r)
        return fed.models


def _dp_sgd(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dp: DPSGD, seed: int
            ) -> tuple[torch.nn.Module, float]:
    """The project's DP-SGD recipe (codream_secure.sample_dp, Opacus RDP accountant); (model, ε)."""
    from codream_secure.sample_dp import SampleLevelTrainer, make_private_ready

    net = make_private_ready(net)  # BatchNorm -> GroupNorm, as Opacus requires
    trainer = SampleLevelTrainer(n_samples=len(y), batch_size=dp.batch_size,
                                 max_grad_norm=dp.max_grad_norm, delta=dp.delta,
                                 noise_multiplier=dp.noise_multiplier, lr=dp.lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trainer.train(net, x, y, epochs=dp.epochs)
    return net, float(trainer.epsilon())


def _reference_recipe(method: str, s: MembershipSettings) -> str:
    if method == "codream":
        return s.codream_references
    return method


def _attack(targets: _Models, refs: _Models, global_std: bool) -> dict[str, np.ndarray]:
    """Scores and labels of every (target model, candidate) pair in the game."""
    ref_phi = np.stack(refs.phi)
    in_mask, out_mask = np.stack(refs.member), ~np.stack(refs.in_world)
    pooled: dict[str, list[np.ndarray]] = {k: [] for k in (*ATTACKS, "label", "model", "point")}
    for m, (phi, member, world) in enumerate(zip(targets.phi, targets.member, targets.in_world,
                                                 strict=True)):
        # non-members are points no client of the target's federation held; other clients'
        # points are left out (in CoDream and FedAvg they reach the model indirectly)
        keep = member | ~world
        lira = mm.lira_scores(phi, ref_phi, in_mask, out_mask, global_std=global_std)
        for key, values in (("lira-online", lira.online), ("lira-offline", lira.offline),
                            ("confidence", phi), ("label", member.astype(int)),
                            ("model", np.full(phi.size, m)), ("point", np.arange(phi.size))):
            pooled[key].append(values[keep])
    return {k: np.concatenate(v) for k, v in pooled.items()}


def _metrics(scores: np.ndarray, labels: np.ndarray, s: MembershipSettings) -> dict:
    return {
        "auc": mm.auc(scores, labels),
        "tpr_at_1pct_fpr": mm.tpr_at_fpr(scores, labels, 0.01),
        "tpr_at_0.1pct_fpr": mm.tpr_at_fpr(scores, labels, 0.001),
        "eps_lb": mm.epsilon_lower_bound(scores, labels, delta=s.delta, confidence=s.confidence),
        "eps_lb_split": mm.epsilon_lower_bound_split(scores, labels, delta=s.delta,
                                                     confidence=s.confidence, seed=s.seed),
    }


def _plot(curves: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, float]],
          out_dir: Path) -> str:
    """Log-log ROC: one colour per method, solid online / dashed offline LiRA, chance diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(m for m, _ in curves))}
    for (method, attack), (fpr, tpr, area) in curves.items():
        ax.plot(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), color=colours[method],
                linestyle="--" if attack == "lira-offline" else "-",
                label=f"{method}, {attack} (AUC {area:.3f})")
    grid = np.logspace(-5, 0, 50)
    ax.plot(grid, grid, color="grey", linewidth=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(1e-4, 1), ylim=(1e-4, 1.05),
           xlabel="false positive rate", ylabel="true positive rate",
           title="LiRA membership inference (log-log ROC)")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, out_dir, "membership_roc.png")


def run(settings: MembershipSettings, out_dir: Path, progress=None) -> SectionResult:
    """Play the membership game for every method: rows per (method, attack), ROC plot, scores."""
    start = time.perf_counter()
    s = settings
    _check(s)
    previous_threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        return _run(s, out_dir, progress, start)
    finally:
        torch.set_num_threads(previous_threads)


def _run(s: MembershipSettings, out_dir: Path, progress, start: float) -> SectionResult:
    log = progress.log if progress is not None else (lambda _msg: None)
    game = _Game(s)
    rng = np.random.default_rng(s.seed)
    methods = list(s.methods) + (["isolated+dp-sgd"] if s.dp is not None else [])
    recipes = sorted({_reference_recipe(m, s) for m in methods})
    ref_worlds = _balanced_worlds(game.n, s.reference_worlds, rng)
    refs: dict[str, _Models] = {r: _Models() for r in recipes}
    for w, members in enumerate(ref_worlds):
        parts = _split(members, s.clients, rng)
        for recipe in recipes:
            game.train(recipe, parts, world_seed=1000 * (s.seed + 1) + 100 + w, out=refs[recipe])
        log(f"membership: reference world {w + 1}/{s.reference_worlds} trained")
    targets: dict[str, _Models] = {m: _Models() for m in methods}
    for w in range(s.target_worlds):
        members = np.zeros(game.n, bool)
        members[rng.permutation(game.n)[: game.n // 2]] = True
        parts = _split(members, s.clients, rng)
        for m in methods:
            game.train(m, parts, world_seed=1000 * (s.seed + 1) + w, out=targets[m],
                       aggregator=s.aggregator if m == "codream" else "plain")
        log(f"membership: target world {w + 1}/{s.target_worlds} trained")
    rows, raw, curves, summary = [], [], {}, {}
    for m in methods:
        pooled = _attack(targets[m], refs[_reference_recipe(m, s)], s.global_std)
        labels = pooled["label"]
        common = {"method": m, "reference_recipe": _reference_recipe(m, s),
                  "members": int(labels.sum()), "non_members": int((1 - labels).sum()),
                  "target_models": len(targets[m].phi),
                  "test_accuracy": float(np.mean(targets[m].test_acc)),
                  "train_accuracy": float(np.mean(targets[m].train_acc)),
                  "accountant_epsilon": targets[m].epsilon}
        for attack in ATTACKS:
            row = {**common, "attack": attack, **_metrics(pooled[attack], labels, s)}
            rows.append(row)
            if attack != "confidence":
                fpr, tpr, _ = mm.roc_curve(pooled[attack], labels)
                curves[(m, attack)] = (fpr, tpr, row["auc"])
        online = next(r for r in rows if r["method"] == m and r["attack"] == "lira-online")
        summary[m] = {k: v for k, v in online.items() if k not in ("method", "attack")}
        raw += [{"method": m, "model": int(pooled["model"][i]), "point": int(pooled["point"][i]),
                 "member": int(labels[i]),
                 **{a: float(pooled[a][i]) for a in ATTACKS}} for i in range(labels.size)]
    figure = _plot(curves, out_dir)
    notes = [
        "Online LiRA (IN and OUT reference models per point), per-example Gaussian fits of the "
        "logit-scaled confidence log(p_y/(1-p_y)); "
        + ("one variance shared by all points" if s.global_std else "per-example variances")
        + f"; {s.reference_worlds} reference worlds, each point IN in exactly half.",
        "Non-members are points outside the target's federation; other clients' points are "
        "excluded from the game. Scores are pooled over the target models of a method, so "
        "non-member scores of one point on different models are not independent.",
        "TPR at an FPR below 1/(non-members) is reported as None (not resolvable).",
        "eps_lb maximises the Clopper-Pearson bound over thresholds on the same scores "
        "(optimistic); eps_lb_split picks the threshold on half the scores and bounds on the "
        f"other half (holds at {s.confidence:.0%}).",
    ]
    if "codream" in methods and s.codream_references == "isolated":
        notes.append("CoDream targets are attacked with isolated-recipe reference models (no "
                     "dream distillation): a recipe mismatch expected to weaken the attack; "
                     "codream_references=\"codream\" trains CoDream reference runs instead.")
    if s.dp is None:
        notes.append("DP off: pass dp=DPSGD(noise_multiplier=...) to add a DP-SGD target.")
    return SectionResult(
        name="membership", title="(c) Membership inference on the final models (LiRA)",
        summary={"population": game.n, **summary},
        rows=rows, arrays={"scores": raw}, figures=[figure], notes=notes,
        seconds=time.perf_counter() - start)


__all__ = ["DEFAULT", "DPSGD", "FULL", "TINY", "MembershipSettings", "run"]
