"""A member's evaluation: reused only while its model's state is exactly what was scored."""

from __future__ import annotations

import os

import pytest
import torch

from codream_secure import member as member_module
from codream_secure.config import CoDreamConfig, SimulationConfig
from codream_secure.member import Member, state_digest
from codream_secure.models import build_model
from codream_secure.results import ClientData
from codream_secure.simulation import run_simulation

from .tiny_runs import TINY


def _member(bn_statistics: str = "recalibrated") -> Member:
    torch.manual_seed(0)
    model = build_model("smallcnn", input_shape=(1, 8, 8), num_classes=3)
    x = torch.randn(40, 1, 8, 8)
    y = torch.arange(40) % 3
    data = ClientData(x[:30], y[:30], x[30:], y[30:])
    return Member(0, model, data, x, y, codream=CoDreamConfig(bn_statistics=bn_statistics),
                  seed=0)


def _counting_passes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every recalibration and evaluation pass a member makes."""
    passes: list[str] = []
    recalibrate, evaluate = member_module.recalibrate_batchnorm, member_module.evaluate

    def counted_recalibrate(*args, **kwargs):
        passes.append("recalibrate")
        return recalibrate(*args, **kwargs)

    def counted_evaluate(*args, **kwargs):
        passes.append("evaluate")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(member_module, "recalibrate_batchnorm", counted_recalibrate)
    monkeypatch.setattr(member_module, "evaluate", counted_evaluate)
    return passes


def test_an_unchanged_model_is_scored_once(monkeypatch):
    member, passes = _member(), _counting_passes(monkeypatch)
    first = member.evaluate()
    assert passes == ["recalibrate", "evaluate", "evaluate"]
    assert member.evaluate() == first
    assert len(passes) == 3  # no second pass over the data


def test_a_changed_weight_is_scored_again(monkeypatch):
    member, passes = _member(), _counting_passes(monkeypatch)
    member.evaluate()
    with torch.no_grad():
        next(member.model.parameters()).view(-1)[0] += 1e-6
    member.evaluate()
    assert passes.count("recalibrate") == 2 and passes.count("evaluate") == 4


def test_changed_running_statistics_are_scored_again_when_they_are_not_re_estimated(
        monkeypatch):
    member, passes = _member("running"), _counting_passes(monkeypatch)
    member.evaluate()
    bn = next(m for m in member.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var.mul_(4.0)
    member.evaluate()
    assert passes == ["evaluate"] * 4


def test_the_digest_tells_apart_states_that_differ_in_one_value_or_one_buffer():
    model = build_model("smallcnn", input_shape=(1, 8, 8), num_classes=3)
    before = state_digest(model)
    assert state_digest(model) == before
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.num_batches_tracked += 1
    assert state_digest(model) != before
    bn.num_batches_tracked -= 1
    assert state_digest(model) == before
    with torch.no_grad():
        model.to(torch.bfloat16)  # same shapes, other bytes
    assert state_digest(model) != before


@pytest.mark.parametrize("keys", [dict(round_order="distill-last"),
                                  dict(round_order="joint"),
                                  dict(round_order="local-last", kd_gate="validation")],
                         ids=["distill-last", "joint", "local-last-gated"])
def test_reused_scores_change_no_number_of_a_run(keys, tmp_path, monkeypatch):
    """The same run with every evaluation made afresh (a digest that never matches) reports
    the same accuracies, and made more passes over the data."""
    passes = _counting_passes(monkeypatch)
    config = {**TINY, "baselines": (), **keys}
    reused = run_simulation(SimulationConfig.from_keys(**config, out=str(tmp_path / "a")))
    reused_passes = len(passes)
    monkeypatch.setattr(member_module, "state_digest", lambda model: os.urandom(32))
    fresh = run_simulation(SimulationConfig.from_keys(**config, out=str(tmp_path / "b")))
    assert len(passes) - reused_passes > reused_passes  # the control did score every time
    for a, b in zip(reused.report["rounds"], fresh.report["rounds"], strict=True):
        assert a["codream"] == b["codream"]
        assert a.get("kd") == b.get("kd")
    assert reused.report["final"] == fresh.report["final"]
