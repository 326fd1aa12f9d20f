"""Local training, knowledge distillation loss and loop, evaluation and soft labels."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from codream_secure.distill import distill, evaluate, kd_loss, soft_labels, train_local
from codream_secure.errors import ConfigError


def _bn_cnn(classes: int = 2, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # module init only
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 8),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Linear(8, classes),
        )


def _toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable 2-class images: class 0 lights the left half, class 1 the right half."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = 0.5 * torch.randn(n, 1, 4, 4, generator=gen)
    x[y == 0, :, :, :2] += 1.0
    x[y == 1, :, :, 2:] += 1.0
    return x, y


def _ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


# --- kd_loss ----------------------------------------------------------------------------


def test_kd_loss_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    assert kd_loss(logits, logits, teacher_kind="logits").item() == 0.0
    assert kd_loss(logits, F.softmax(logits, dim=1), teacher_kind="probs").item() == pytest.approx(
        0.0, abs=1e-5
    )
    other = logits.flip(1)
    assert kd_loss(logits, other, teacher_kind="logits").item() > 0
    assert kd_loss(logits, F.softmax(other, dim=1), teacher_kind="probs").item() > 0


def test_kd_loss_matches_hand_kl_for_logits_teacher():
    t = 20.0
    student = torch.zeros(1, 2)  # softmax(student / T) = (1/2, 1/2)
    teacher = torch.tensor([[t * math.log(3.0), 0.0]])  # softmax(teacher / T) = (3/4, 1/4)
    hand = t**2 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    got = kd_loss(student, teacher, temperature=t, teacher_kind="logits")
    assert got.item() == pytest.approx(hand, rel=1e-5)


def test_kd_loss_matches_hand_kl_for_probability_teacher():
    t = 2.0
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[0.9, 0.1]])  # p^(1/2) = (sqrt .9, sqrt .1), normalised (3/4, 1/4)
    hand = t**2 * (0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5))
    got = kd_loss(student, teacher, temperature=t, teacher_kind="probs")
    assert got.item() == pytest.approx(hand, rel=1e-5)


def test_kd_loss_batchmean_and_zero_probabilities():
    t = 3.0
    student = torch.tensor([[0.0, 0.0], [1.0, -1.0]], requires_grad=True)
    one = kd_loss(student[:1], torch.tensor([[1.0, 0.0]]), temperature=t, teacher_kind="probs")
    # a zero teacher probability keeps zero tempered mass: KL = -log q_0 = log 2
    assert one.item() == pytest.approx(t**2 * math.log(2.0), rel=1e-6)
    # even at T = 20, where clamping log 0 to log(float32 tiny) would leave 1.3% mass
    hot = kd_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), teacher_kind="probs")
    assert hot.item() == pytest.approx(400 * math.log(2.0), rel=1e-6)
    teacher = torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    both = kd_loss(student, teacher, temperature=t, teacher_kind="probs")
    rows = [
        kd_loss(student[i : i + 1], teacher[i : i + 1], temperature=t, teacher_kind="probs")
        for i in range(2)
    ]
    assert both.item() == pytest.approx((rows[0] + rows[1]).item() / 2, rel=1e-6)
    both.backward()
    assert torch.isfinite(student.grad).all()
    # decoded sums may dip slightly below zero: treated as zero
    noisy = kd_loss(student[:1], torch.tensor([[1.0, -1e-4]]), temperature=t, teacher_kind="probs")
    assert noisy.item() == pytest.approx(one.item())


def test_kd_loss_validates():
    s = torch.zeros(2, 3)
    with pytest.raises(ConfigError):
        kd_loss(s, torch.zeros(2, 4), teacher_kind="logits")
    with pytest.raises(ConfigError):
        kd_loss(s, s, teacher_kind="soft")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        kd_loss(s, s, temperature=0.0, teacher_kind="logits")
    with pytest.raises(ConfigError):
        kd_loss(s, torch.zeros(2, 3), teacher_kind="probs")


# --- train_local ------------------------------------------------------------------------


def test_train_local_lowers_loss_and_learns():
    x, y = _toy(200, seed=1)
    model = _bn_cnn()
    before = _ce(model, x, y)
    model.train()
    out = train_local(
        model, x, y, epochs=8, batch_size=32, generator=torch.Generator().manual_seed(0)
    )
    assert model.training  # previous mode restored
    assert out["steps"] == 8 * math.ceil(200 / 32) and len(out["epoch_losses"]) == 8
    assert out["epoch_losses"][-1] < out["epoch_losses"][0]
    assert _ce(model, x, y) < 0.5 * before
    assert evaluate(model, x, y) > 0.9


def test_train_local_is_deterministic_for_a_seed():
    x, y = _toy(100, seed=2)
    a, b = _bn_cnn(seed=3), _bn_cnn(seed=3)
    c = copy.deepcopy(a)
    kw = {"epochs": 2, "batch_size": 16}
    train_local(a, x, y, generator=torch.Generator().manual_seed(42), **kw)
    train_local(b, x, y, generator=torch.Generator().manual_seed(42), **kw)
    train_local(c, x, y, generator=torch.Generator().manual_seed(43), **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_train_local_survives_a_trailing_batch_of_one_and_validates():
    x, y = _toy(33, seed=3)
    model = _bn_cnn().eval()
    out = train_local(model, x, y, epochs=1, batch_size=16, generator=torch.Generator())
    assert out["steps"] == 2 and not model.training
    with pytest.raises(ConfigError):
        train_local(model, x, y[:-1], epochs=1, generator=torch.Generator())
    with pytest.raises(ConfigError):
        train_local(model, x, y, epochs=1, batch_size=0, generator=torch.Generator())


# --- distill ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_distill_makes_student_agree_with_teacher(kind):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with torch.no_grad():
        teacher[1].weight.mul_(4.0)
    x = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    targets = soft_labels(teacher, x, kind=kind)
    wanted = targets.argmax(dim=1)
    assert wanted.bincount(minlength=3).min() > 30  # the teacher uses every class
    student = _bn_cnn(classes=3, seed=5)
    before = (soft_labels(student, x, kind="logits").argmax(1) == wanted).float().mean().item()
    out = distill(
        student,
        x,
        targets,
        epochs=30,
        lr=1e-2,
        batch_size=64,
        temperature=4.0,
        teacher_kind=kind,
        generator=torch.Generator().manual_seed(2),
        optimizer="adam",
    )
    after = (soft_labels(student, x, kind="logits").argmax(1) == wanted).float().mean().item()
    assert after > 0.9 and after > before + 0.2, (before, after)
    assert out["epoch_losses"][-1] < out["epoch_losses"][0]


def test_distill_sgd_is_deterministic_and_validates():
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    teacher = torch.randn(64, 2, generator=torch.Generator().manual_seed(4))
    a, b = _bn_cnn(seed=1), _bn_cnn(seed=1)
    kw = {"epochs": 2, "lr": 0.05, "batch_size": 16, "teacher_kind": "logits"}
    distill(a, x, teacher, generator=torch.Generator().manual_seed(9), **kw)
    distill(b, x, teacher, generator=torch.Generator().manual_seed(9), **kw)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    with pytest.raises(ConfigError):
        distill(a, x, teacher, generator=torch.Generator(), optimizer="lbfgs", **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        distill(a, x[:10], teacher, generator=torch.Generator(), **kw)


# --- evaluate and soft labels -----------------------------------------------------------


def test_evaluate_counts_correct_predictions_and_restores_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])
    model.train()
    assert evaluate(model, x, y, batch_size=3) == 0.75
    assert model.training
    with pytest.raises(ConfigError):
        evaluate(model, x[:0], y[:0])


def test_soft_labels_kinds_and_eval_mode():
    model = _bn_cnn(classes=3)
    model.train()
    x = torch.randn(20, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    logits = soft_labels(model, x, kind="logits", batch_size=7)
    probs = soft_labels(model, x, kind="probs")
    assert model.training
    model.eval()
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(logits, ref)  # eval mode: per-sample, batching does not matter
    torch.testing.assert_close(probs, F.softmax(ref, dim=1))
    assert probs.dtype == torch.float32
    with pytest.raises(ConfigError):
        soft_labels(model, x, kind="labels")  # type: ignore[arg-type]


def test_bf16_fast_path_trains_and_distils_and_bad_precision_is_refused():
    from codream_secure.models import build_model

    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    model = build_model("smallcnn", input_shape=(1, 8, 8), num_classes=10)
    out = train_local(model, x, y, epochs=3, lr=0.05, batch_size=16, precision="bf16",
                      generator=torch.Generator().manual_seed(0))
    assert out["epoch_losses"][-1] < out["epoch_losses"][0]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a cast
    teacher = torch.softmax(torch.randn(64, 10), dim=1)
    kd = distill(model, x, teacher, epochs=2, lr=0.05, batch_size=16, teacher_kind="probs",
                 precision="bf16", generator=torch.Generator().manual_seed(0))
    assert math.isfinite(kd["loss"])
    with pytest.raises(ConfigError, match="precision"):
        train_local(model, x, y, epochs=1, precision="fp16",
                    generator=torch.Generator().manual_seed(0))
