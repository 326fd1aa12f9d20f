"""Generator mode (CoDream-fast): the update vector, Reptile, the non-finite guard, determinism,
secure vs plain sums, dropouts, the adaptive term, and a tiny run through the CLI and --resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from codream_secure import checkpoint
from codream_secure.baselines import flatten_state
from codream_secure.cli import main
from codream_secure.config import SimulationConfig
from codream_secure.config.codream import CoDreamConfig
from codream_secure.dreams import DreamLossWeights, dream_objective
from codream_secure.errors import ConfigError
from codream_secure.federation import AggregationChannel, generator
from codream_secure.generator_dreams import (
    GeneratorDreamer,
    GeneratorSettings,
    NoDreamsError,
    SlimGenerator,
    adapt,
    apply_update,
    batch_of_step,
    generator_vector,
    render,
)
from codream_secure.models import build_model
from codream_secure.simulation import run_simulation
from tests.core.tiny_runs import TINY, killed_then_resumed_outcome, write_toml

SHAPE = (1, 8, 8)
SETTINGS = GeneratorSettings(batches=2, local_steps=2, lr=5e-3, meta_lr=0.5, latent_dim=8,
                             dream_batch=6)


def _models(n: int = 3) -> list[torch.nn.Module]:
    models = []
    for k in range(n):
        torch.manual_seed(100 + k)
        models.append(build_model("smallcnn", input_shape=SHAPE, num_classes=10))
    return models


def _objective(models):
    def loss(client: int, batch: int, x: torch.Tensor) -> torch.Tensor:
        return dream_objective(models[client], x, DreamLossWeights())
    return loss


def _dreamer(settings: GeneratorSettings = SETTINGS, seed: int = 7) -> GeneratorDreamer:
    return GeneratorDreamer(SHAPE, mean=(0.5,), std=(0.25,), settings=settings, init_seed=seed)


def _channel(aggregator: str = "plain", n: int = 3, clip: float = 8.0) -> AggregationChannel:
    return AggregationChannel(aggregator, n, clip=clip, ring_bits=32, expected_dropout=0.0,
                              purpose="generator-update")


def _dream(dreamer: GeneratorDreamer, channel, models, round_index: int = 1, **options):
    if isinstance(channel, AggregationChannel):
        channel.open(dreamer.vector_length, seed=("test", round_index))
    return dreamer.dream(round_index, range(len(models)), _objective(models), channel,
                         latent_seeds=lambda b: generator(0, "latents", round_index, b),
                         **options)


class FixedSum:
    """A plain channel whose released sum is replaced for some batches (what a broken decode
    or an overflowing float sum would give)."""

    device_masking = False

    def __init__(self, broken: dict[int, float]) -> None:
        self.broken, self.batch = broken, 0

    def sum(self, inputs, *, drop_after_upload=()):
        self.batch += 1
        total = np.sum(list(inputs.values()), axis=0, dtype=np.float64)
        if self.batch in self.broken:
            total[0] = self.broken[self.batch]
        return total, frozenset(inputs)


@pytest.mark.parametrize(("shape", "mean", "std"), [
    ((1, 8, 8), (0.5,), (0.5,)), ((1, 28, 28), (0.29,), (0.35,)),
    ((3, 32, 32), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])
def test_the_slim_generator_fits_each_input_in_its_normalised_range(shape, mean, std):
    net = SlimGenerator(shape, latent_dim=100, mean=mean, std=std)
    assert sum(p.numel() for p in net.parameters()) < 500_000
    x = net(torch.randn(5, 100))
    assert tuple(x.shape) == (5, *shape)
    low = (0 - torch.tensor(mean)) / torch.tensor(std)
    high = (1 - torch.tensor(mean)) / torch.tensor(std)
    assert (x >= low.view(1, -1, 1, 1) - 1e-5).all() and (x <= high.view(1, -1, 1, 1) + 1e-5).all()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    with pytest.raises(ConfigError, match="one mean and std per channel"):
        SlimGenerator(shape, latent_dim=4, mean=(0.5, 0.5), std=(0.5,))


@pytest.mark.parametrize("seed", range(4))
def test_applying_one_clients_update_gives_back_its_generator(seed):
    torch.manual_seed(seed)
    model = _models(1)[0]
    start = SlimGenerator(SHAPE, latent_dim=8, mean=(0.5,), std=(0.25,))
    latents = torch.randn(6, 8)
    adapted, z = adapt(start, latents, lambda x: dream_objective(model, x, DreamLossWeights()),
                       steps=3, lr=0.05)
    update = generator_vector(adapted, z) - generator_vector(start, latents)
    assert update.dtype == np.float32
    assert update.size == generator_vector(start, latents).size  # weights, BN stats, latents
    mean = np.sum([update], axis=0, dtype=np.float64) / 1  # the mean over one client
    back, back_z = apply_update(start, latents, mean)
    want, got = generator_vector(adapted, z), generator_vector(back, back_z)
    # a float32 difference carries one rounding: within half an ulp of the update (plus the
    # final rounding to float32) of the client's own values
    bound = (np.spacing(np.abs(update)) + np.spacing(np.abs(want))) / 2
    assert (np.abs(got - want) <= bound).all()
    assert np.abs(update).max() > 1e3 * bound.max()  # the generator really moved
    # BatchNorm running statistics travel in the vector and come back
    for name, buffer in adapted.state_dict().items():
        if "running" in name:
            torch.testing.assert_close(back.state_dict()[name], buffer, rtol=0, atol=1e-6)
            assert not torch.equal(buffer, start.state_dict()[name])
    with pytest.raises(ConfigError, match="needs"):
        apply_update(start, latents, update[:-1])


def _running_statistics_mask(net: torch.nn.Module) -> np.ndarray:
    """Which entries of flatten_state(net) are BatchNorm running statistics."""
    return np.concatenate([np.full(t.numel(), "running" in name)
                           for name, t in net.state_dict().items() if t.is_floating_point()])


def test_clipping_the_running_statistics_of_an_update_changes_no_dream():
    """A secure sum clips the generator's running-statistics changes at generator_clip; the
    dreams and the next batch's weight changes must not depend on them."""
    defaults = CoDreamConfig()
    model = _models(1)[0]
    start = SlimGenerator(SHAPE, latent_dim=8, mean=(0.5,), std=(0.25,))
    latents = torch.randn((6, 8), generator=generator(0, "latents", 1, 1))
    loss = lambda x: dream_objective(model, x, DreamLossWeights())  # noqa: E731
    update = generator_vector(*adapt(start, latents, loss, steps=defaults.generator_local_steps,
                                     lr=defaults.generator_lr)) - generator_vector(start, latents)
    mask = np.concatenate([_running_statistics_mask(start), np.zeros(latents.numel(), bool)])
    clip = defaults.generator_clip
    assert np.abs(update[mask]).max() > clip >= np.abs(update[~mask]).max()  # only they clip
    clipped = np.where(mask, np.clip(update, -clip, clip), update)
    (g_full, z_full), (g_clip, z_clip) = (apply_update(start, latents, u)
                                          for u in (update, clipped))
    assert torch.equal(render(g_full, z_full), render(g_clip, z_clip))
    again = [generator_vector(*adapt(g, z, loss, steps=3, lr=defaults.generator_lr))
             for g, z in ((g_full, z_full), (g_clip, z_clip))]
    assert np.array_equal(again[0][~mask], again[1][~mask])
    # the control: a change of the same size to one weight does change the dreams
    nudged = update.copy()
    nudged[np.flatnonzero(~mask)[0]] += np.abs(update - clipped).max()
    assert not torch.equal(render(g_full, z_full), render(*apply_update(start, latents, nudged)))


def test_the_reptile_step_moves_the_meta_generator_towards_the_mean_adapted_generator():
    models = _models()
    dreamer = _dreamer()
    before = flatten_state(dreamer.meta).astype(np.float64)
    adapted = []
    for batch in (1, 2):  # what each batch's round generator is, computed independently
        latents = torch.randn((6, 8), generator=generator(0, "latents", 1, batch))
        begin = generator_vector(dreamer.meta, latents)
        updates = [generator_vector(*adapt(dreamer.meta, latents,
                                           lambda x, c=c, b=batch: _objective(models)(c, b, x),
                                           steps=2, lr=5e-3)) - begin for c in range(3)]
        mean = np.sum(updates, axis=0, dtype=np.float64) / 3
        adapted.append(flatten_state(apply_update(dreamer.meta, latents, mean)[0]))
    outcome = _dream(dreamer, _channel(), models)
    target = np.mean(np.stack(adapted).astype(np.float64), axis=0)
    want = (before + 0.5 * (target - before)).astype(np.float32)
    np.testing.assert_allclose(flatten_state(dreamer.meta), want, rtol=0, atol=1e-6)
    assert np.abs(target - before).max() > 1e-3
    assert tuple(outcome.dreams.shape) == (12, *SHAPE) and outcome.members == {0, 1, 2}
    full = _dreamer(GeneratorSettings(**{**SETTINGS.__dict__, "meta_lr": 1.0}))
    _dream(full, _channel(), models)
    np.testing.assert_allclose(flatten_state(full.meta), target.astype(np.float32), rtol=0,
                               atol=1e-6)


def test_a_batch_whose_released_sum_is_not_finite_is_skipped():
    models = _models()
    dreamer, control = _dreamer(), _dreamer()
    outcome = _dream(dreamer, FixedSum({1: float("inf")}), models)
    assert outcome.skipped == 1 and "batch 1: the released sum is not finite" in outcome.reasons
    assert tuple(outcome.dreams.shape) == (6, *SHAPE)  # batch 2's dreams only
    assert dreamer.skipped == {1: outcome.reasons}
    assert np.isfinite(flatten_state(dreamer.meta)).all()
    kept = _dream(control, FixedSum({}), models)  # the control keeps both batches
    assert kept.skipped == 0 and tuple(kept.dreams.shape) == (12, *SHAPE)
    torch.testing.assert_close(outcome.dreams, kept.dreams[6:])
    # every batch broken: no dreams, and the meta-generator stays where it was
    stuck = _dreamer()
    before = flatten_state(stuck.meta)
    with pytest.raises(NoDreamsError, match="all 2 dream batches were skipped"):
        _dream(stuck, FixedSum({1: float("nan"), 2: float("inf")}), models)
    np.testing.assert_array_equal(flatten_state(stuck.meta), before)


def test_a_client_whose_update_is_not_finite_makes_its_batch_skipped():
    models = _models()

    def loss(client: int, batch: int, x: torch.Tensor) -> torch.Tensor:
        value = dream_objective(models[client], x, DreamLossWeights())
        return value * float("nan") if (client, batch) == (1, 2) else value

    dreamer, channel = _dreamer(), _channel("secagg")
    channel.open(dreamer.vector_length, seed=("nan",))
    outcome = dreamer.dream(1, range(3), loss, channel,
                            latent_seeds=lambda b: generator(0, "latents", 1, b))
    assert outcome.skipped == 1 and outcome.reasons[0].startswith("batch 2: client 1's vector")
    assert outcome.members == {0, 1, 2} and len(outcome.dreams) == 6


def test_the_same_seed_gives_the_same_dreams_bit_for_bit():
    models = _models()
    first = _dream(_dreamer(), _channel(), models).dreams
    again = _dream(_dreamer(), _channel(), models).dreams
    assert torch.equal(first, again)
    other = _dream(_dreamer(seed=8), _channel(), models).dreams
    assert not torch.equal(first, other)


@pytest.mark.parametrize("aggregator", ["secagg", "secagg+"])
def test_secure_and_plain_sums_of_generator_updates_agree_within_the_bound(aggregator):
    models = _models(4)
    dreamer = _dreamer()
    latents = torch.randn((6, 8), generator=generator(0, "latents", 1, 1))
    begin = generator_vector(dreamer.meta, latents)
    updates = {c: generator_vector(*adapt(dreamer.meta, latents,
                                          lambda x, c=c: _objective(models)(c, 1, x),
                                          steps=2, lr=5e-3)) - begin for c in range(4)}
    secure, plain = _channel(aggregator, 4), _channel("plain", 4)
    for channel in (secure, plain):
        channel.open(dreamer.vector_length, seed=("agree",))
    s_total, s_in = secure.sum(updates)
    p_total, p_in = plain.sum(updates)
    assert s_in == p_in == frozenset(range(4))
    assert max(np.abs(u).max() for u in updates.values()) <= secure.clip  # nothing clipped
    assert 0 < np.abs(s_total - p_total).max() <= secure.error_bound
    # whole rounds: the dreams differ by what the generator makes of that error
    s_dreams = _dream(_dreamer(), _channel(aggregator, 4), models).dreams
    p_dreams = _dream(_dreamer(), _channel("plain", 4), models).dreams
    assert (s_dreams - p_dreams).abs().max() < 1e-4


def test_a_dropout_step_maps_to_a_batch_and_the_client_leaves_from_there():
    assert [batch_of_step(s, 10, 2) for s in (1, 5, 6, 10)] == [1, 1, 2, 2]
    assert [batch_of_step(s, 3, 5) for s in (1, 2, 3)] == [2, 4, 5]
    with pytest.raises(ConfigError, match="outside"):
        batch_of_step(11, 10, 2)
    models = _models(4)
    outcome = _dream(_dreamer(), _channel("plain", 4), models,
                     leaving={2: (1, False), 3: (2, True)})
    assert outcome.members == {0, 1}  # 3 uploaded for batch 2, then left
    assert set(outcome.bytes_down) == {0, 1, 3}  # 2 never received a batch
    assert outcome.bytes_down[3] == outcome.bytes_down[0] == 2 * 4 * _dreamer().vector_length


def test_the_adaptive_term_moves_dreams_along_the_servers_direction():
    def indifferent(client: int, batch: int, x: torch.Tensor) -> torch.Tensor:
        return 0.0 * x.sum()

    def upwards(x: torch.Tensor) -> torch.Tensor:  # a server whose entropy grows with x
        return torch.ones_like(x)

    outcomes = {}
    for weight in (0.0, 1.0):
        dreamer = _dreamer()
        channel = _channel()
        channel.open(dreamer.vector_length, seed=("adaptive",))
        outcomes[weight] = dreamer.dream(
            1, range(3), indifferent, channel, adaptive=upwards, adaptive_weight=weight,
            latent_seeds=lambda b: generator(0, "latents", 1, b))
    start = _dreamer()
    first = start.meta.train()(torch.randn((6, 8), generator=generator(0, "latents", 1, 1)))
    assert outcomes[1.0].dreams[:6].mean() > first.mean() + 0.05
    torch.testing.assert_close(outcomes[0.0].dreams[:6], first.detach())  # no loss, no move


def test_generator_mode_refuses_client_level_dp_but_takes_sample_level_dp():
    with pytest.raises(ConfigError, match="not built for client-level DP"):
        SimulationConfig.from_keys(dream_mode="generator", dp="client", dp_noise=1.0)
    SimulationConfig.from_keys(dream_mode="generator", dp="sample", dp_noise=1.0)


GENERATOR = dict(TINY, dream_mode="generator", generator_batches=2, generator_local_steps=2,
                 generator_latent_dim=8, buffer_size=32)


def test_simulate_in_generator_mode_through_the_cli(tmp_path):
    out = tmp_path / "cli"
    toml = write_toml(tmp_path / "run.toml", max_train=240, max_test=120,
                      server_model="smallcnn", warmup_epochs=1, dream_batch=8, buffer_size=32,
                      distill_epochs=1, baselines=(), threads=1, generator_batches=2,
                      generator_local_steps=2, generator_latent_dim=8, adaptive_after=1)
    result = CliRunner().invoke(main, [
        "simulate", "--config", str(toml), "--clients", "3", "--models", "smallcnn",
        "--rounds", "2", "--dream-mode", "generator", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["codream"]["dream_mode"] == "generator"
    assert [r["skipped_batches"] for r in report["rounds"]] == [None, 0, 0]
    assert all(r["included_in_dreams"] == [0, 1, 2] and min(r["bytes_up"]) > 0
               for r in report["rounds"][1:])
    assert report["aggregator"]["measured"]["steps_compared"] == 2 * (2 + 1)
    with np.load(out / "dreams.npz") as dreams:
        assert dreams["dreams"].shape == (16, 1, 8, 8)
    assert "skipped batches" in (out / "report.md").read_text()


def test_resume_continues_the_meta_generator(tmp_path, monkeypatch):
    config = SimulationConfig.from_keys(**{**GENERATOR, "aggregator": "plain",
                                           "out": str(tmp_path / "whole")})
    whole = run_simulation(config)
    resumed = killed_then_resumed_outcome(monkeypatch, config.replace(out=str(tmp_path / "cut")))
    assert resumed.report["timing"]["resumed"]
    np.testing.assert_array_equal(resumed.dreams, whole.dreams)  # round 2's dreams, bit for bit
    for a, b in zip(resumed.report["rounds"], whole.report["rounds"], strict=True):
        assert a["codream"] == b["codream"]
    # control: a resume that left the meta-generator at its first weights dreams otherwise
    real_load = checkpoint._load_weights

    def forgetful(model, weights, what):
        if what != "meta-generator":
            real_load(model, weights, what)

    monkeypatch.setattr(checkpoint, "_load_weights", forgetful)
    forgot = killed_then_resumed_outcome(monkeypatch, config.replace(out=str(tmp_path / "lost")))
    assert not np.array_equal(forgot.dreams, whole.dreams)


def test_label_conditioned_generator_dreams_aim_every_batch_at_the_rounds_targets(tmp_path):
    config = SimulationConfig.from_keys(**{**GENERATOR, "dream_objective": "label",
                                           "teacher": "class-aware", "rounds": 1,
                                           "out": str(tmp_path / "label")})
    outcome = run_simulation(config)
    quality = outcome.report["rounds"][1]["teacher"]
    assert outcome.dreams.shape == (16, 1, 8, 8)  # two batches of 8
    assert 0.0 <= quality["target_reached"] <= 1.0
