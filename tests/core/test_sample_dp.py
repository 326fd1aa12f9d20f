"""Sample-level DP: model conversion, DP-SGD training, epsilon equal to a direct Opacus count,
noise and batches that no published seed replays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from codream_secure.distill import train_local
from codream_secure.dreams import DreamLossWeights, dream_gradient
from codream_secure.errors import ConfigError
from codream_secure.models import MODEL_NAMES, build_model
from codream_secure.sample_dp import (
    KeystreamPoissonSampler,
    SampleLevelTrainer,
    make_private_ready,
)

N, BATCH = 256, 64


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64, 2))


def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 1, 4, 4, generator=g)
    return x, (x[:, 0, 0, 0] + x[:, 0, 3, 3] > 0).long()


def trainer(**kw) -> SampleLevelTrainer:
    args = dict(n_samples=N, batch_size=BATCH, max_grad_norm=1.0, delta=1e-3,
                noise_multiplier=0.7, lr=0.5, momentum=0.0, weight_decay=0.0)
    return SampleLevelTrainer(**{**args, **kw})


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_converted_models_have_no_batchnorm_and_run(name):
    model = build_model(name, input_shape=(1, 8, 8), num_classes=3)
    fixed = make_private_ready(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fixed.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is kept
    fixed.eval()
    with torch.no_grad():
        assert fixed(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_dream_loss_of_a_groupnorm_model_needs_no_bn_term():
    fixed = make_private_ready(build_model("resnet8", input_shape=(1, 8, 8), num_classes=3))
    x = torch.randn(4, 1, 8, 8)
    grad = dream_gradient(fixed, x, DreamLossWeights(), use_bn_statistics=False)
    assert grad.shape == x.shape and torch.isfinite(grad).all()
    with pytest.raises(ConfigError, match="use_bn_statistics=False"):
        dream_gradient(fixed, x, DreamLossWeights())


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def test_dp_training_learns_and_epsilon_matches_opacus():
    model, (x, y), tr = tiny_model(), tiny_data(), trainer()
    before = _loss(model, x, y)
    first = tr.train(model, x, y, epochs=3)
    second = tr.train(model, x, y, epochs=2)  # one accountant across rounds
    assert _loss(model, x, y) < before - 0.05
    assert first["steps"] == 3 * tr.steps_per_epoch and second["steps"] == 2 * tr.steps_per_epoch
    assert math.isfinite(second["epsilon"]) and second["epsilon"] > first["epsilon"] > 0
    # the same count straight through Opacus: q = 1/ceil(N/B), z, 5 epochs of steps
    direct = RDPAccountant()
    for _ in range(5 * math.ceil(N / BATCH)):
        direct.step(noise_multiplier=0.7, sample_rate=1 / math.ceil(N / BATCH))
    assert tr.epsilon() == pytest.approx(direct.get_epsilon(delta=1e-3), rel=1e-12)
    report = tr.ledger.to_report()
    assert report["unit"] == "sample" and report["releases"] == 5 * math.ceil(N / BATCH)
    # no Opacus hooks or per-sample gradients are left on the model
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_target_epsilon_is_spent_over_the_planned_epochs():
    model, (x, y) = tiny_model(), tiny_data()
    tr = trainer(noise_multiplier=None, target_epsilon=4.0, planned_epochs=2)
    tr.train(model, x, y, epochs=1)
    tr.train(model, x, y, epochs=1)
    assert 4.0 - 0.05 <= tr.epsilon() <= 4.0
    with pytest.raises(ConfigError, match="calibrated for 2 epochs"):
        tr.train(model, x, y, epochs=1)


def test_refusals():
    x, y = tiny_data()
    with pytest.raises(ConfigError, match="make_private_ready"):
        trainer().train(build_model("smallcnn", input_shape=(1, 4, 4), num_classes=2), x, y,
                        epochs=1)
    with pytest.raises(ConfigError, match="one dataset"):
        trainer().train(tiny_model(), x[:10], y[:10], epochs=1)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        trainer(noise_multiplier=None)
    with pytest.raises(ConfigError, match="not both"):
        trainer(target_epsilon=1.0)
    with pytest.raises(ConfigError, match="delta"):
        trainer(delta=1.0 / N)


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _one_dp_step(seed: int) -> torch.Tensor:
    """One full-batch DP-SGD step from the same weights, data and torch seed."""
    model, (x, y) = tiny_model(), tiny_data()
    torch.manual_seed(seed)  # everything seeded stays seeded: only the noise may differ
    trainer(batch_size=N).train(model, x, y, epochs=1)
    return _weights(model)


def test_dp_sgd_noise_does_not_replay_from_the_published_seed():
    # The attacker knows the seed (report.json), the data split and the initial weights, and
    # replays the run to learn the noise. Two runs with the same seed must differ.
    first, second = _one_dp_step(0), _one_dp_step(0)
    diff = first - second
    # one step of lr 0.5 on noise of std z C / N per coordinate: two independent draws differ
    # by about 0.5 * sqrt(2) * 0.7 / 256 ~ 2e-3; bit-identical weights would give exactly 0
    assert float(diff.abs().max()) > 1e-4
    assert float(diff.std()) == pytest.approx(0.5 * math.sqrt(2) * 0.7 / N, rel=0.2)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus: "Secure RNG turned off"
def test_control_a_seeded_opacus_noise_generator_replays_bit_for_bit():
    # The defence off: Opacus' own noise from a generator seeded like the run's seed.
    def seeded_step() -> torch.Tensor:
        model, (x, y) = tiny_model(), tiny_data()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loader = DataLoader(TensorDataset(x, y), batch_size=N)
        engine = PrivacyEngine()
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.7,
            max_grad_norm=1.0, poisson_sampling=False, noise_generator=torch.Generator()
            .manual_seed(0))
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        return _weights(model)

    assert torch.equal(seeded_step(), seeded_step())


def test_training_without_dp_stays_reproducible():
    def local_step() -> torch.Tensor:
        model, (x, y) = tiny_model(), tiny_data()
        train_local(model, x, y, epochs=1, lr=0.5, batch_size=BATCH,
                    generator=torch.Generator().manual_seed(0))
        return _weights(model)

    assert torch.equal(local_step(), local_step())


def test_poisson_batches_come_from_the_keystream():
    q, n, steps = 0.25, 400, 50
    batches = list(KeystreamPoissonSampler(n, q, steps))
    again = list(KeystreamPoissonSampler(n, q, steps))
    assert len(batches) == steps and batches != again
    sizes = np.array([len(b) for b in batches])
    # mean of 50 Binomial(400, 1/4) sizes: std sqrt(400 q (1 - q) / 50) ~ 1.2; allow 5 sigma
    assert abs(sizes.mean() - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)
    assert all(b == sorted(set(b)) and all(0 <= i < n for i in b) for b in batches)
