"""Joint acquisition: local training that distils on dreams in every step."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from codream_secure import member as member_module
from codream_secure.config import SimulationConfig
from codream_secure.distill import distill, evaluate, train_local
from codream_secure.errors import ConfigError
from codream_secure.joint_training import joint_steps, train_joint
from codream_secure.member import Member, trains_after_acquisition
from codream_secure.simulation import run_simulation

from .tiny_runs import TINY

CENTRES = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])


def _cluster(label: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return CENTRES[label] + noise, torch.full((n,), label)


def _task() -> dict:
    """A client that holds classes 0 and 1; dreams of class 2 labelled by a confident teacher;
    a test set of all three classes."""
    (x0, y0), (x1, y1) = _cluster(0, 100, 1), _cluster(1, 100, 2)
    dreams, _ = _cluster(2, 64, 3)
    teacher = torch.tensor([[0.05, 0.05, 0.9]]).repeat(64, 1)
    tests = [_cluster(label, 100, 10 + label) for label in range(3)]
    return dict(x=torch.cat([x0, x1]), y=torch.cat([y0, y1]), dreams=dreams, teacher=teacher,
                tests=tests)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3))


def _accuracies(model: nn.Module, tests: list) -> list[float]:
    return [evaluate(model, x, y) for x, y in tests]


def _joint(task: dict, kd_weight: float) -> nn.Module:
    model = _model()
    train_joint(model, task["x"], task["y"], task["dreams"], task["teacher"], local_epochs=3,
                distill_epochs=3, lr=0.05, kd_weight=kd_weight, batch_size=32,
                teacher_kind="probs", temperature=2.0, generator=torch.Generator().manual_seed(0))
    return model


def test_joint_training_learns_the_dreamt_class_and_keeps_its_own():
    task = _task()
    own_0, own_1, dreamt = _accuracies(_joint(task, 1.0), task["tests"])
    assert min(own_0, own_1) > 0.95 and dreamt > 0.9
    # the control: without the distillation term nothing teaches class 2
    assert _accuracies(_joint(task, 0.0), task["tests"])[2] == 0.0


def test_distillation_then_local_training_forgets_what_joint_training_keeps():
    """Why joint rounds exist: local training on the client's own classes after distillation
    overwrites the dreamt class, where the same steps taken jointly keep it."""
    task = _task()
    model = _model()
    distill(model, task["dreams"], task["teacher"], epochs=3, lr=0.05, batch_size=32,
            temperature=2.0, teacher_kind="probs", generator=torch.Generator().manual_seed(0))
    learnt = _accuracies(model, task["tests"])[2]
    train_local(model, task["x"], task["y"], epochs=20, lr=0.05, batch_size=32,
                generator=torch.Generator().manual_seed(0))
    assert learnt > 0.9
    assert _accuracies(model, task["tests"])[2] < 0.5
    assert _accuracies(_joint(task, 1.0), task["tests"])[2] > 0.9


@given(private=st.integers(1, 500), dreams=st.integers(1, 700), local=st.integers(0, 4),
       distil=st.integers(0, 6), batch=st.integers(1, 128))
def test_joint_steps_give_each_stream_at_least_its_epochs(private, dreams, local, distil, batch):
    steps = joint_steps(private, dreams, local_epochs=local, distill_epochs=distil,
                        batch_size=batch)
    assert steps * min(batch, private) >= local * private
    assert steps * min(batch, dreams) >= distil * dreams
    assert steps == max(local * math.ceil(private / min(batch, private)),
                        distil * math.ceil(dreams / min(batch, dreams)))


def test_every_joint_batch_has_the_same_shape(monkeypatch):
    """Private batches wrap around the shuffles, so a compiled step sees one shape."""
    from codream_secure import joint_training

    shapes = []
    real = joint_training._joint_terms

    def spy(model, x, y, dreams, *rest):
        shapes.append((x.shape[0], dreams.shape[0]))
        return real(model, x, y, dreams, *rest)

    monkeypatch.setattr(joint_training, "_joint_terms", spy)
    task = _task()
    result = train_joint(_model(), task["x"][:70], task["y"][:70], task["dreams"][:50],
                         task["teacher"][:50], local_epochs=2, distill_epochs=1, lr=0.05,
                         kd_weight=1.0, batch_size=32, teacher_kind="probs",
                         generator=torch.Generator().manual_seed(0))
    assert result["steps"] == len(shapes) == 6  # 2 epochs x ceil(70 / 32)
    assert set(shapes) == {(32, 32)}


@pytest.mark.parametrize(("change", "message"), [
    ({"kd_weight": -1.0}, "kd_weight"),
    ({"kd_weight": float("nan")}, "kd_weight"),
    ({"dreams": torch.zeros(64, 3)}, "differ in shape"),
    ({"teacher": torch.zeros(10, 3)}, "one teacher row each"),
    ({"y": torch.zeros(5, dtype=torch.long)}, "private set"),
    ({"lr": 0.0}, "learning rate"),
])
def test_bad_joint_inputs_are_named(change, message):
    task = _task()
    args = dict(x=task["x"], y=task["y"], dreams=task["dreams"], teacher=task["teacher"],
                lr=0.05, kd_weight=1.0)
    args.update(change)
    with pytest.raises(ConfigError, match=message):
        train_joint(_model(), args.pop("x"), args.pop("y"), args.pop("dreams"),
                    args.pop("teacher"), local_epochs=1, distill_epochs=1, batch_size=32,
                    teacher_kind="probs", generator=torch.Generator().manual_seed(0), **args)


@pytest.mark.parametrize(("order", "acquired", "trains"), [
    ("distill-last", True, False), ("distill-last", False, False),
    ("local-last", True, True), ("local-last", False, True),
    ("joint", True, False), ("joint", False, True),
])
def test_who_trains_after_acquisition(order, acquired, trains):
    codream = SimulationConfig.from_keys(round_order=order).codream
    assert trains_after_acquisition(codream, acquired=acquired) is trains


def test_a_joint_run_trains_members_jointly_and_a_dropped_client_alone(tmp_path, monkeypatch):
    calls: list[tuple[str, int, int]] = []
    real_train, real_joint = Member.train, member_module.train_joint

    def train(self, round_index, epochs):
        calls.append(("local", round_index, self.index))
        return real_train(self, round_index, epochs)

    def joint(model, *args, **kwargs):
        calls.append(("joint", -1, -1))
        return real_joint(model, *args, **kwargs)

    monkeypatch.setattr(Member, "train", train)
    monkeypatch.setattr(member_module, "train_joint", joint)
    config = SimulationConfig.from_keys(**{**TINY, "clients": 4, "aggregator": "plain",
                                           "round_order": "joint", "kd_weight": 2.0,
                                           "dropout_clients": (3,), "baselines": (),
                                           "out": str(tmp_path / "run")})
    report = run_simulation(config).report
    rounds = report["rounds"][1:]
    assert all(r["kd"]["clients"] == [0, 1, 2] for r in rounds)
    local_after_warmup = {(r, c) for kind, r, c in calls if kind == "local" and r > 0}
    assert local_after_warmup == {(r, 3) for r in range(1, len(rounds) + 1)}
    assert sum(kind == "joint" for kind, _, _ in calls) == 3 * len(rounds)
    assert report["config"]["codream"]["kd_weight"] == 2.0
