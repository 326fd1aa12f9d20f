"""Device-masking clients and numpy clients in one ChaCha20 session (torch on the CPU here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from codream_secure.dreams import NonFiniteGradientError
from codream_secure.errors import ConfigError
from codream_secure.gpu.chacha20 import available_backends
from codream_secure.gpu.masking import protocol_masker, protocol_unmasker
from protocols.api import SecAggSession
from protocols.codec import FixedPointCodec
from protocols.errors import MalformedMessageError
from protocols.secagg.messages import SessionOffer
from protocols.secagg.server import host_unmask


def _inputs(n: int, m: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(4)
    return {c: rng.uniform(-1, 1, m).astype(np.float32) for c in range(n)}


def _session(maskers=None, prg="chacha20", **kw) -> SecAggSession:
    # nearest rounding: stochastic rounding is keyed by each client's own secret, so two
    # sessions agree bit for bit only without it (test_gpu_masking checks the stochastic path)
    kw.setdefault("rounding", "nearest")
    return SecAggSession(4, 300, clip=1.0, protocol="secagg", prg=prg, maskers=maskers,
                         rounding_seed=b"r" * 32, **kw)


CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DEVICES = [pytest.param("cpu", "torch", False, id="cpu"),
           pytest.param("cpu", "triton", True, id="cpu-fused", marks=pytest.mark.skipif(
               "triton" not in available_backends("cpu"), reason="needs TRITON_INTERPRET=1")),
           pytest.param("cuda", "auto", False, id="cuda", marks=CUDA),
           pytest.param("cuda", "auto", True, id="cuda-fused", marks=CUDA)]


@pytest.mark.parametrize(("device", "backend", "fused"), DEVICES)
def test_mixed_device_and_numpy_clients_sum_exactly_like_numpy_clients(device, backend, fused):
    inputs = _inputs(4, 300)
    mixed = _session({c: protocol_masker(backend=backend, fused=fused) for c in (0, 2)})
    numpy_only = _session()
    for step in range(2):
        tensors = {c: torch.from_numpy(v).to(device) if c in (0, 2) else v
                   for c, v in inputs.items()}
        a = mixed.step(tensors, drop_after_upload=[3] if step == 0 else [])
        b = numpy_only.step(inputs, drop_after_upload=[3] if step == 0 else [])
        np.testing.assert_array_equal(a.ring_total, b.ring_total)
        inputs = {c: v for c, v in inputs.items() if c != 3}
    exact = sum(_inputs(4, 300)[c].astype(np.float64) for c in range(3))
    np.testing.assert_allclose(a.total, exact, atol=mixed.error_bound(3))


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu"),
                                    pytest.param("cuda", id="cuda", marks=CUDA)])
def test_a_device_unmasking_server_sums_exactly_like_the_numpy_server(device):
    inputs = _inputs(4, 300)
    on_device = _session({c: protocol_masker(backend="torch") for c in (1, 3)},
                         unmasker=protocol_unmasker(device))
    numpy_only = _session()
    for step in range(3):  # step 1: client 2 drops after uploading, so its pair masks go too
        dropped = [2] if step == 1 else []
        tensors = {c: torch.from_numpy(v) if c in (1, 3) else v for c, v in inputs.items()}
        a = on_device.step(tensors, drop_after_upload=dropped)
        b = numpy_only.step(inputs, drop_after_upload=dropped)
        assert a.included == b.included and a.dropped == b.dropped
        np.testing.assert_array_equal(a.ring_total, b.ring_total)
        np.testing.assert_array_equal(a.total, b.total)
        inputs = {c: v for c, v in inputs.items() if c not in dropped}
    assert a.included == frozenset({0, 1, 3})


@settings(max_examples=25, deadline=None)
@given(ring_bits=st.sampled_from([8, 20, 32, 40, 64]), n=st.integers(1, 4),
       m=st.integers(1, 70), signs=st.lists(st.sampled_from([1, -1]), max_size=20),
       seed=st.integers(0, 2**32 - 1))
@example(ring_bits=32, n=2, m=33, signs=[1, -1] * 10, seed=0)  # 20 masks: two keystream chunks
def test_the_device_unmasker_equals_host_unmask_bit_for_bit(ring_bits, n, m, signs, seed):
    codec = FixedPointCodec.for_clients(4, clip=1.0, ring_bits=ring_bits, prg="chacha20")
    rng = np.random.default_rng(seed)
    info = np.iinfo(codec.dtype)
    uploads = [rng.integers(0, info.max, m, dtype=codec.dtype, endpoint=True) & codec.mask
               for _ in range(n)]
    signed_seeds = [(rng.bytes(32), sign) for sign in signs]
    want = host_unmask(uploads, signed_seeds, codec)
    got = protocol_unmasker("cpu", backend="torch")(uploads, signed_seeds, codec)
    assert got.dtype == want.dtype and got.shape == (m,)
    np.testing.assert_array_equal(got, want)


def test_the_device_unmasker_refuses_an_aes_session_and_foreign_vectors():
    unmask = protocol_unmasker("cpu")
    aes = FixedPointCodec.for_clients(4, clip=1.0, ring_bits=32)
    chacha = FixedPointCodec.for_clients(4, clip=1.0, ring_bits=32, prg="chacha20")
    with pytest.raises(ConfigError, match="prg='chacha20'"):
        unmask([np.zeros(3, np.uint32)], [], aes)
    with pytest.raises(ConfigError, match="uint32 ring vectors"):
        unmask([np.zeros(3, np.int64)], [], chacha)
    with pytest.raises(ConfigError, match="signs must be"):
        unmask([np.zeros(3, np.uint32)], [(bytes(32), 2)], chacha)


def test_the_masker_refuses_nan_unless_its_caller_already_did():
    inputs = {c: torch.from_numpy(v) for c, v in _inputs(4, 300).items()}
    inputs[1][7] = float("nan")
    checking = _session({c: protocol_masker(backend="torch") for c in range(4)})
    with pytest.raises(NonFiniteGradientError, match="1 non-finite value"):
        checking.step(inputs)
    # check_finite=False trusts the caller (federation.AggregationChannel checks all clients
    # with one sync): the NaN is encoded, not refused
    trusting = _session({c: protocol_masker(backend="torch", check_finite=False)
                         for c in range(4)})
    assert trusting.step(inputs).included == frozenset(range(4))


def test_chacha_and_aes_sessions_agree_on_the_sum():
    inputs = _inputs(4, 300)
    a = _session(prg="chacha20").step(inputs)
    b = _session(prg="aes-256-ctr").step(inputs)
    np.testing.assert_allclose(a.total, b.total, atol=2 * _session().error_bound(4))


def test_a_device_masker_in_an_aes_session_is_a_configuration_error():
    session = _session({0: protocol_masker(backend="torch")}, prg="aes-256-ctr")
    with pytest.raises(ConfigError, match="prg='chacha20'"):
        session.step(_inputs(4, 300))


def test_a_masker_returning_the_wrong_type_is_refused():
    session = _session({1: lambda vector, codec, secrets: np.zeros(300, np.int64)})
    outcome = session.step(_inputs(4, 300))
    assert outcome.included == frozenset({0, 2, 3}) and 1 in outcome.dropped
    (_, client, error), = session.network.refusals
    assert client == 1 and "the protocol needs (300,) uint32" in str(error)


def test_offer_carries_the_prg_and_refuses_unknown_codes():
    offer = SessionOffer(b"s" * 16, 0, 4, 3, 2, b"g" * 32, 32, 20, 1.0, 10, "nearest", "chacha20")
    assert SessionOffer.decode(offer.encode()) == offer
    bad = bytearray(offer.encode())
    bad[-2] = 7  # the PRG code; the threat model's code follows it
    with pytest.raises(MalformedMessageError, match="PRG"):
        SessionOffer.decode(bytes(bad))


def test_session_host_cost_benchmark_runs_and_is_consistent():
    from codream_secure.audit.device.host_cost import host_cost

    for unmasker in ("host", "device"):
        total, outside, server = host_cost(3, 100, 2, unmasker=unmasker)
        assert 0 < server < outside <= total


def test_session_host_cost_interleaves_unmaskers_and_records_every_turn(monkeypatch):
    from codream_secure.audit.device import host_cost as bench

    order: list[str] = []
    step = bench._TimedSession.step

    def logged(self, inputs, *, record=True):
        order.append(("warm " if not record else "") + f"{self.masker}/{self.unmasker}")
        step(self, inputs, record=record)

    monkeypatch.setattr(bench._TimedSession, "step", logged)
    costs = bench.host_costs(3, 64, 2, ("host", "none"), maskers=("fixed",), turns=2)
    assert order == ["warm fixed/host", "warm fixed/none", "fixed/host", "fixed/host",
                     "fixed/none", "fixed/none", "fixed/host", "fixed/host", "fixed/none",
                     "fixed/none"]
    assert set(costs) == {("fixed", "host"), ("fixed", "none")}
    assert costs["fixed", "host"][2] > 0 and costs["fixed", "none"][2] >= 0

    order.clear()
    costs = bench.host_costs(3, 64, 1, ("none",), maskers=("device", "device-pageable"))
    assert order == ["warm device/none", "warm device-pageable/none", "device/none",
                     "device-pageable/none"]
    assert all(total > outside for total, outside, _ in costs.values())  # masking took time


@pytest.mark.parametrize(("argv", "names"), [(["--clients", "1"], "--clients"),
                                             (["--length", "0"], "--length"),
                                             (["--unmasker", "gpu"], "--unmasker"),
                                             (["--unmasker", "host,host"], "--unmasker"),
                                             (["--masker", "gpu"], "--masker"),
                                             (["--masker", "fixed,fixed"], "--masker"),
                                             (["--turns", "0"], "--turns")])
def test_session_host_cost_refuses_bad_arguments_with_exit_2(argv, names):
    from tests.benchmarks.scripts import run_script

    result = run_script("session_host_cost", *argv)
    assert result.returncode == 2 and names in result.stderr
