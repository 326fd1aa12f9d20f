"""federation/simulation: secure equals plain within the codec bound; a real tiny run; resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from codream_secure.cli import main
from codream_secure.config import SimulationConfig
from codream_secure.dreams import NonFiniteGradientError, dream_gradient
from codream_secure.errors import ConfigError
from codream_secure.federation import AggregationChannel, CoDreamFederation
from codream_secure.simulation import run_simulation
from tests.core.tiny_runs import TINY, killed_then_resumed, write_toml


@pytest.mark.parametrize("aggregator", ["secagg", "secagg+"])
def test_secure_dream_gradient_sum_equals_plain_within_the_codec_bound(aggregator):
    rng = np.random.default_rng(3)
    grads = {c: rng.normal(0, 0.3, 8 * 64).astype(np.float32) for c in range(4)}
    secure = AggregationChannel(aggregator, 4, clip=8.0, ring_bits=32, expected_dropout=0.0)
    plain = AggregationChannel("plain", 4, clip=8.0, ring_bits=32, expected_dropout=0.0)
    secure.open(8 * 64, seed=("test",))
    plain.open(8 * 64, seed=("test",))
    for _ in range(3):
        s_total, s_in = secure.sum(grads)
        p_total, p_in = plain.sum(grads)
        assert s_in == p_in == frozenset(range(4))
        assert np.max(np.abs(s_total - p_total)) <= secure.error_bound
    assert secure.stats.max_abs_error <= secure.error_bound
    assert secure.stats.clipped == 0
    assert (secure.bytes_up > 4 * 8 * 64 * 3).all()  # masked vectors plus sealed shares


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])


@pytest.mark.parametrize("where", ["cpu", CUDA])
@pytest.mark.parametrize("aggregator", ["secagg", "secagg+"])
def test_device_masked_channel_sums_torch_tensors_like_the_host_channel(aggregator, where):
    rng = np.random.default_rng(5)
    grads = {c: rng.normal(0, 0.3, 8 * 64).astype(np.float32) for c in range(4)}
    device = AggregationChannel(aggregator, 4, clip=8.0, ring_bits=32, expected_dropout=0.0,
                                masking="device", device=torch.device(where))
    # the server unmasks on CUDA, on the host otherwise (numpy is the faster CPU server)
    assert device.device_unmasking == (where == "cuda")
    host = AggregationChannel(aggregator, 4, clip=8.0, ring_bits=32, expected_dropout=0.0)
    device.open(8 * 64, seed=("test",))
    host.open(8 * 64, seed=("test",))
    assert device.session.codec.prg == "chacha20" and host.session.codec.prg == "aes-256-ctr"
    exact = np.sum(list(grads.values()), axis=0, dtype=np.float64)
    for step in range(3):
        tensors = {c: torch.from_numpy(v).to(where) for c, v in grads.items()}
        d_total, d_in = device.sum(tensors, drop_after_upload=[3] if step == 1 else [])
        h_total, h_in = host.sum(grads, drop_after_upload=[3] if step == 1 else [])
        assert d_in == h_in
        np.testing.assert_allclose(d_total, exact, atol=device.error_bound)
        np.testing.assert_allclose(h_total, exact, atol=host.error_bound)
        if step == 1:
            grads = {c: v for c, v in grads.items() if c != 3}
            exact = np.sum(list(grads.values()), axis=0, dtype=np.float64)
    assert 0 < device.stats.max_abs_error <= device.error_bound
    np.testing.assert_array_equal(device.bytes_up, host.bytes_up)  # the same messages


def test_a_device_unmasking_channel_sums_exactly_like_a_host_unmasking_one(monkeypatch):
    # on the CPU the channel keeps numpy's server; force the device unmasker (torch on the CPU
    # here) to check the channel's wiring. Each client keys its dither with its own secret, so
    # two channels agree within the codec's bound, not bit for bit.
    from codream_secure.gpu import masking

    calls, original = [], masking.protocol_unmasker

    def recording_unmasker(device):
        inner = original(device, backend="torch")

        def unmask(uploads, signed_seeds, codec):
            calls.append(len(uploads))
            return inner(uploads, signed_seeds, codec)
        return unmask

    monkeypatch.setattr(masking, "protocol_unmasker", recording_unmasker)
    rng = np.random.default_rng(6)
    grads = {c: torch.from_numpy(rng.normal(0, 0.3, 96).astype(np.float32)) for c in range(4)}
    channels = [AggregationChannel("secagg", 4, clip=8.0, ring_bits=32, expected_dropout=0.0,
                                   masking="device", device=torch.device("cpu"))
                for _ in range(2)]
    channels[0].device_unmasking = True
    for channel in channels:
        channel.open(96, seed=("same",))
    for step in range(2):
        dropped = [2] if step == 1 else []
        (a, a_in), (b, b_in) = (c.sum(grads, drop_after_upload=dropped) for c in channels)
        assert a_in == b_in
        exact = np.sum([grads[c].numpy() for c in a_in], axis=0, dtype=np.float64)
        np.testing.assert_allclose(a, exact, atol=channels[0].error_bound)
        np.testing.assert_allclose(b, exact, atol=channels[1].error_bound)
    assert calls == [4, 4]  # client 2 dropped after its upload: its self mask is recovered


def test_device_masked_channel_names_a_client_with_a_nan_tensor():
    channel = AggregationChannel("secagg", 3, clip=1.0, ring_bits=32, expected_dropout=0.0,
                                 masking="device")
    channel.open(4, seed=("nan",))
    bad = {0: torch.zeros(4), 1: torch.tensor([0.0, float("inf"), 0.0, 0.0]), 2: torch.zeros(4)}
    with pytest.raises(NonFiniteGradientError, match="client 1's vector"):
        channel.sum(bad)
    with pytest.raises(ConfigError, match="masking must be"):
        AggregationChannel("secagg", 3, clip=1.0, ring_bits=32, expected_dropout=0.0,
                           masking="gpu")


def test_a_dropout_after_upload_still_counts_and_leaves_the_session():
    grads = {c: np.full(16, float(c), np.float32) for c in range(4)}
    channel = AggregationChannel("secagg", 4, clip=8.0, ring_bits=32, expected_dropout=0.25)
    channel.open(16, seed=("drop",))
    total, included = channel.sum(grads, drop_after_upload=[2])
    assert included == frozenset(range(4))
    np.testing.assert_allclose(total, np.full(16, 6.0), atol=channel.error_bound)
    total, included = channel.sum({c: grads[c] for c in (0, 1, 3)})
    assert included == {0, 1, 3}
    np.testing.assert_allclose(total, np.full(16, 4.0), atol=channel.error_bound)


def test_a_nan_input_is_an_error_naming_the_client():
    channel = AggregationChannel("secagg", 3, clip=1.0, ring_bits=32, expected_dropout=0.0)
    channel.open(4, seed=("nan",))
    bad = {0: np.zeros(4, np.float32), 1: np.array([0, np.nan, 0, 0], np.float32),
           2: np.zeros(4, np.float32)}
    with pytest.raises(NonFiniteGradientError, match="client 1's vector"):
        channel.sum(bad)


UNCLIPPED = 1024.0  # above every dream-gradient coordinate of the tiny runs


def _run(tmp_path, name, **overrides):
    config = SimulationConfig.from_keys(**{**TINY, **overrides, "out": str(tmp_path / name)})
    return run_simulation(config)


def test_tiny_run_report_has_the_promised_fields(tmp_path):
    outcome = _run(tmp_path, "run", clients=4, dropout_clients=(2,))
    report = outcome.report
    for method in ("codream", "isolated"):
        final = report["final"][method]
        assert 0.0 <= final["mean_accuracy"] <= 1.0
        assert len(final["per_client_accuracy"]) == 4
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    later = report["rounds"][1:]
    assert all(r["dropped"] == [2] and r["included_in_dreams"] == [0, 1, 3] for r in later)
    assert all(r["bytes_up"][0] > 0 for r in later)
    measured = report["aggregator"]["measured"]
    assert measured["steps_compared"] == 2 * (3 + 1)
    if measured["clipped_values"] == 0:
        bound = max(report["aggregator"]["error_bound_per_step"].values())
        assert measured["max_abs_error_vs_plain"] <= bound
    timing = report["timing"]
    assert list(timing["baseline_seconds"]) == ["isolated"]  # the one baseline that ran
    assert 0 < timing["baseline_seconds"]["isolated"] < timing["total_seconds"]
    assert outcome.dreams.shape == (8, 1, 8, 8)
    json.dumps(report)  # serialisable as it stands


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    whole = _run(tmp_path, "whole").report
    config = SimulationConfig.from_keys(**{**TINY, "out": str(tmp_path / "killed")})
    resumed = killed_then_resumed(monkeypatch, config)
    assert resumed["final"] == whole["final"]
    for a, b in zip(resumed["rounds"], whole["rounds"], strict=True):
        assert a["codream"] == b["codream"]


def test_too_few_survivors_skips_the_exchange_and_says_so(tmp_path, monkeypatch):
    # 3 clients, t = 2: with one gone, each survivor has 1 live share holder, too few. A fixed
    # dropout_clients like that is refused up front; random dropouts can still get there.
    monkeypatch.setattr(CoDreamFederation, "_dropouts", lambda self, r: {2: (1, False)})
    report = _run(tmp_path, "few", clients=3, rounds=1, baselines=()).report
    assert report["rounds"][1]["included_in_dreams"] == []
    assert "threshold needs 2" in report["rounds"][1]["note"]
    assert report["final"]["codream"]["mean_accuracy"] >= 0.0


def test_cli_end_to_end_and_a_bad_resume(tmp_path):
    out = tmp_path / "cli"
    toml = write_toml(tmp_path / "run.toml", max_train=240, max_test=120,
                      server_model="smallcnn", warmup_epochs=1, dream_batch=8, buffer_size=16,
                      distill_epochs=1, baselines=("isolated",), threads=1)
    flags = ["simulate", "--config", str(toml), "--clients", "3", "--models", "smallcnn",
             "--rounds", "1", "--dream-steps", "2", "--out", str(out)]
    result = CliRunner().invoke(main, flags)
    assert result.exit_code == 0, result.output
    for name in ("report.json", "report.md", "accuracy.png", "dreams.png"):
        assert (out / name).is_file()
    result = CliRunner().invoke(main, [*flags[:-2], "--out", str(tmp_path / "none"), "--resume"])
    assert result.exit_code == 2 and "no checkpoint" in result.output
    assert "Traceback" not in result.output


def test_paillier_channel_equals_plain_within_the_codec_bound():
    grads = {c: np.random.default_rng(c).normal(0, 0.3, 200).astype(np.float32) for c in range(3)}
    channel = AggregationChannel("paillier", 3, clip=8.0, ring_bits=32, expected_dropout=0.0,
                                 key_bits=2048)
    channel.open(200, seed=("paillier",))
    total, included = channel.sum(grads)
    assert included == frozenset(range(3))
    exact = np.sum([grads[c] for c in range(3)], axis=0, dtype=np.float64)
    assert np.max(np.abs(total - exact)) <= channel.error_bound
    keypair = channel._keypair
    channel.open(200, seed=("paillier", 2))  # a new session keeps the run's key holder
    assert channel._keypair is keypair
    assert (channel.bytes_up > 200).all()


def test_tiny_run_under_paillier(tmp_path):
    # BatchNorm statistics re-estimated after one tiny warm-up epoch pull the dreams hard:
    # a clip that their gradients stay under keeps clipping out of the comparison
    report = _run(tmp_path, "paillier", aggregator="paillier", paillier_bits=2048, rounds=1,
                  baselines=(), grad_clip=UNCLIPPED).report
    measured = report["aggregator"]["measured"]
    assert report["aggregator"]["name"] == "paillier" and measured["steps_compared"] == 3 + 1
    bound = max(report["aggregator"]["error_bound_per_step"].values())
    assert measured["max_abs_error_vs_plain"] <= bound


def test_tiny_run_with_device_masking_and_its_refusals(tmp_path):
    report = _run(tmp_path, "device", masking="device", rounds=1, baselines=(),
                  grad_clip=UNCLIPPED).report
    assert report["config"]["device"]["masking"] == "device"
    agg = report["aggregator"]
    assert agg["masking"] == {"dream": "device", "labels": "host"}
    assert agg["unmasking"] == {"dream": "host", "labels": "host"}  # the CPU: numpy's server
    assert 0 < agg["measured"]["max_abs_error_vs_plain"] <= max(
        agg["error_bound_per_step"].values())
    assert report["rounds"][1]["included_in_dreams"] == [0, 1, 2]


def _spy_on_dream_gradients(monkeypatch) -> list[tuple[float, float]]:
    """Per client and step: (rel. distance of its gradient to its own fp32 reference, smallest
    rel. distance to another client's)."""
    real = CoDreamFederation._dream_gradients
    checked: list[tuple[float, float]] = []

    def spy(self, clients, x, targets=None):
        grads = real(self, clients, x, targets)
        refs = {c: dream_gradient(self.models[c], x, self.weights) for c in range(self.n)}
        for c, grad in zip(clients, grads, strict=True):
            others = [float((grad - refs[o]).norm() / refs[o].norm()) for o in refs if o != c]
            checked.append((float((grad - refs[c]).norm() / refs[c].norm()), min(others)))
        return grads

    monkeypatch.setattr(CoDreamFederation, "_dream_gradients", spy)
    return checked


def test_batched_fast_path_gives_each_client_its_own_gradient(tmp_path, monkeypatch):
    checked = _spy_on_dream_gradients(monkeypatch)
    _run(tmp_path, "bf16-own", precision="bf16", rounds=1, baselines=(), clients=4,
         models=("smallcnn", "resnet8"), dream_steps=2)
    assert len(checked) == 8  # 2 steps x 4 clients
    for own, other in checked:
        assert own < 0.2 < other or own < other / 2  # bf16 moves grad_x by up to ~20 %
    for bad, message in (({"aggregator": "plain"}, "has none"),
                         ({"dp": "client", "dp_noise": 1.0}, "client-level DP")):
        with pytest.raises(ConfigError, match=message):
            SimulationConfig.from_keys(**{**TINY, "masking": "device", **bad})
    toml = write_toml(tmp_path / "device.toml", masking="device")
    result = CliRunner().invoke(main, ["simulate", "--config", str(toml), "--aggregator",
                                       "paillier"])
    assert result.exit_code == 2 and "[device] masking" in result.output
    assert "Traceback" not in result.output


def test_one_graph_for_all_clients_gives_each_client_its_own_gradient(tmp_path, monkeypatch):
    # dream_graph="one" needs CUDA; a CPU stand-in for GraphedDreamGradients runs the same
    # groups eagerly and returns the real class's ordering, so simulate's wiring is what runs
    from codream_secure.config import device as device_section
    from codream_secure.gpu import graphed
    from codream_secure.gpu.fast_dream import BatchedDreamStep, FastDreamStep

    built = []

    class StandIn:
        def __init__(self, models, x_shape, weights, *, groups, **options):
            built.append(([list(g) for g in groups], options, tuple(x_shape)))
            self.steps = [FastDreamStep(models[g[0]], weights) if len(g) == 1 else
                          BatchedDreamStep([models[i] for i in g], weights) for g in groups]
            self.order = [i for g in groups for i in g]

        def __call__(self, x):
            rows = []
            for step in self.steps:
                out = step(x)
                rows += [out] if out.dim() == x.dim() else list(out.unbind())
            return graphed.in_model_order(rows, self.order)

    # the config's CUDA check passes; the run itself still resolves "auto" to the CPU
    monkeypatch.setattr(device_section, "cuda_available", lambda: True)
    monkeypatch.setattr(graphed, "GraphedDreamGradients", StandIn)
    checked = _spy_on_dream_gradients(monkeypatch)
    # groups {0, 2} (smallcnn) and {1} (resnet8) and {3} (wrn16_1); client 2 drops out
    report = _run(tmp_path, "one-graph", precision="bf16", dream_graph="one", device="auto",
                  rounds=1, baselines=(), clients=4,
                  models=("smallcnn", "resnet8", "smallcnn", "wrn16_1"), dream_steps=2,
                  dropout_clients=(2,)).report
    assert report["machine"]["device"] == "cpu"
    assert len(built) == 1 and built[0][0] == [[0, 2], [1], [3]]  # built once, grouped
    assert built[0][1] == {"use_bn_statistics": True, "precision": "bf16"}
    assert report["rounds"][1]["included_in_dreams"] == [0, 1, 3]
    assert len(checked) == 6  # 2 steps x 3 members: the dropped client's gradient is unused
    for own, other in checked:
        assert own < 1e-5 < other  # the stand-in's steps are fp32: its own gradient, exactly


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_run_with_one_dream_graph_for_all_clients(tmp_path, monkeypatch):
    from codream_secure.gpu.graphed import GraphedDreamGradients

    used = []
    real = CoDreamFederation._dream_gradients

    def spy(self, clients, x):
        used.append(type(self._fast_path(tuple(x.shape))[0][1]))
        return real(self, clients, x)

    monkeypatch.setattr(CoDreamFederation, "_dream_gradients", spy)
    report = _run(tmp_path, "cuda-one-graph", device="cuda", precision="bf16",
                  dream_graph="one", rounds=2, baselines=(), clients=4,
                  models=("smallcnn", "resnet8"), dropout_clients=(3,)).report
    assert used and set(used) == {GraphedDreamGradients}
    assert all(r["included_in_dreams"] == [0, 1, 2] for r in report["rounds"][1:])
    agg = report["aggregator"]
    assert agg["measured"]["max_abs_error_vs_plain"] <= max(agg["error_bound_per_step"].values())
    assert 0.0 <= report["final"]["codream"]["mean_accuracy"] <= 1.0


def test_graph_order_puts_each_gradient_at_its_model():
    from codream_secure.gpu.graphed import in_model_order

    grads = [torch.full((2,), float(k)) for k in range(4)]
    out = in_model_order(grads, [0, 2, 1, 3])  # the graph ran group [0, 2], then 1, then 3
    assert [float(g[0]) for g in out] == [0.0, 2.0, 1.0, 3.0]
    with pytest.raises(ValueError):
        in_model_order(grads, [0, 1])


def test_tiny_run_on_the_bf16_fast_path(tmp_path):
    report = _run(tmp_path, "bf16", precision="bf16", rounds=1, baselines=()).report
    assert report["config"]["device"]["precision"] == "bf16"
    assert 0.0 <= report["final"]["codream"]["mean_accuracy"] <= 1.0
    assert report["rounds"][1]["included_in_dreams"] == [0, 1, 2]


def test_bf16_fast_path_batches_same_architecture_clients_and_skips_dropped_ones(tmp_path):
    # groups {0, 2} and {1, 3}: client 3 drops, its group still runs and its gradient is unused
    report = _run(tmp_path, "bf16-mixed", precision="bf16", rounds=1, baselines=(), clients=4,
                  models=("smallcnn", "resnet8"), dropout_clients=(3,)).report
    assert report["rounds"][1]["included_in_dreams"] == [0, 1, 2]
    assert 0.0 <= report["final"]["codream"]["mean_accuracy"] <= 1.0


def test_a_run_with_compiled_local_training_and_distillation(tmp_path, monkeypatch):
    # simulate takes the compiled training path only on CUDA with bf16; here the same wiring
    # runs on the CPU with aot_eager (Dynamo + AOTAutograd, no inductor) and fp32, whose
    # arithmetic is the eager loop's up to rounding
    from torch._dynamo.utils import counters

    from codream_secure import federation, train_step
    from codream_secure.train_step import FastPath

    eager = _run(tmp_path, "eager", baselines=(), batch_size=8).report
    traced = FastPath(compile_backend="aot_eager", fused_optimizer=False)
    asked: list[dict] = []
    monkeypatch.setattr(federation.FastPath, "optimised",
                        staticmethod(lambda *a, **k: asked.append(k) or traced))
    torch._dynamo.reset()  # graphs another test compiled for these shapes would be reused
    train_step._compiled.cache_clear()
    counters.clear()
    compiled = _run(tmp_path, "compiled", baselines=(), batch_size=8).report
    assert counters["stats"]["unique_graphs"] >= 2  # local training and distillation
    assert asked == [{"cuda_graphs": False}]  # train_cuda_graphs "off" reaches the fast path
    for got, want in zip(compiled["rounds"], eager["rounds"], strict=True):
        # 120 test samples: a rounding difference may move a sample or two, not more
        assert got["codream"]["test"] == pytest.approx(want["codream"]["test"], abs=0.02)


def test_a_model_that_distillation_breaks_in_the_last_round_is_an_error(tmp_path, monkeypatch):
    from codream_secure import federation, member

    real = member.distill

    def poisoned(model, *args, **kwargs):
        real(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(member, "distill", poisoned)
    with pytest.raises(federation.ModelDivergedError,
                       match=r"client 0's model holds NaN or inf after round 1's distillation"):
        _run(tmp_path, "nan", rounds=1, baselines=())
    toml = write_toml(tmp_path / "run.toml", max_train=240, max_test=120,
                      server_model="smallcnn", dream_batch=8, buffer_size=16, baselines=(),
                      threads=1)
    result = CliRunner().invoke(main, ["simulate", "--config", str(toml), "--rounds", "1",
                                       "--clients", "3", "--models", "smallcnn",
                                       "--dream-steps", "2", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "[codream] distill_lr or kd_temperature" in result.output
    assert "Traceback" not in result.output
