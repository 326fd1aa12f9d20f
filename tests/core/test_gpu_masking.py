"""Device masking equals the protocol's numpy client bit for bit when the PRG is ChaCha20."""

from __future__ import annotations

import math
import os
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codream_secure.dreams import NonFiniteGradientError
from codream_secure.errors import ConfigError
from codream_secure.gpu import masking
from codream_secure.gpu.chacha20 import available_backends
from protocols.codec import FixedPointCodec
from protocols.graph import complete_graph
from protocols.network import InProcessNetwork
from protocols.primitives import prg
from protocols.secagg import client as client_module
from protocols.secagg import keys
from protocols.secagg.client import SecAggClient
from protocols.secagg.messages import MaskedInput
from protocols.secagg.server import SecAggServer


def awkward_vector(m: int, seed: int, clip: float, dtype=np.float32) -> np.ndarray:
    """Uniform values plus edge cases: clipped, huge (scaling overflows), ties, tiny negatives."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.5 * clip, 1.5 * clip, m)
    big = float(np.finfo(dtype).max)
    x[:8] = [clip, -clip, big, -big, 0.0, -1e-30, 2.0**-10, -(2.0**-10)]
    return x.astype(dtype)


@pytest.mark.parametrize("ring_bits", [16, 32, 40, 64])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype,clip", [(np.float32, 1.0), (np.float16, 0.5), (np.float32, 0.3),
                                        (np.float64, 1.0)])
def test_encode_equals_the_numpy_codec(ring_bits, rounding, dtype, clip):
    # clip 0.3 is not a float32 value, so both sides must switch to float64 work
    codec = FixedPointCodec.for_clients(4, clip=clip, ring_bits=ring_bits, rounding=rounding,
                                        prg="chacha20")
    x = awkward_vector(1000 + ring_bits, ring_bits, clip, dtype)
    key = os.urandom(32)
    expected = codec.encode(x, rounding_key=key)
    got = masking.encode(torch.from_numpy(x), codec, rounding_key=key)
    assert got.dtype == masking.ring_dtype(codec)
    assert np.array_equal(masking.to_numpy_ring(got, codec), expected)


def test_stochastic_encoding_depends_on_the_key():
    codec = FixedPointCodec.for_clients(2, clip=1.0, ring_bits=16, rounding="stochastic",
                                        prg="chacha20")
    x = torch.linspace(-0.9, 0.9, 4001)
    a = masking.encode(x, codec, rounding_key=bytes(32))
    b = masking.encode(x, codec, rounding_key=bytes(31) + b"\x01")
    assert not torch.equal(a, b)  # a test that could not fail would prove nothing


def test_non_finite_input_is_refused():
    codec = FixedPointCodec.for_clients(2, clip=1.0, prg="chacha20")
    with pytest.raises(NonFiniteGradientError):
        masking.encode(torch.tensor([0.0, float("nan")]), codec, rounding_key=bytes(32))


def _session(n: int, m: int, *, ring_bits: int, seed: int):
    codec = FixedPointCodec.for_clients(n, clip=1.0, ring_bits=ring_bits, rounding="stochastic",
                                        prg="chacha20")
    values = np.random.default_rng(seed).uniform(-1.2, 1.2, (3, n, m)).astype(np.float32)
    server = SecAggServer(graph=complete_graph(n), threshold=2, codec=codec, vector_length=m)
    clients = {c: SecAggClient(lambda step, c=c: values[step, c], rounding_seed=bytes([c]) * 32)
               for c in range(n)}
    network = InProcessNetwork(server, clients)
    network.setup()
    return server, clients, codec, values


@pytest.mark.parametrize("ring_bits", [24, 32, 44])
def test_masked_upload_equals_the_secagg_client_and_the_server_unmasks_it(
        monkeypatch, ring_bits):
    n, m, step = 4, 515, 1
    server, clients, codec, values = _session(n, m, ring_bits=ring_bits, seed=ring_bits)
    self_seeds: list[bytes] = []

    def recording_urandom(size: int) -> bytes:
        self_seeds.append(os.urandom(size))
        return self_seeds[-1]

    monkeypatch.setattr(client_module, "os", types.SimpleNamespace(urandom=recording_urandom))
    requests = server.open_step()
    replies, uploads = {}, {}
    for cid in range(n):
        reply = MaskedInput.decode(clients[cid].handle(requests[cid]))
        client = clients[cid]
        sid = client._offer.session_id
        pair_seeds = {peer: keys.pair_step_seed(client._pair_keys[peer], session_id=sid, step=step)
                      for peer in range(n) if peer != cid}
        rounding_key = client_module.kdf.derive_key(
            client._dither_secret, session_id=sid, purpose="stochastic-rounding",
            context=(bytes([cid]) * 32, step))
        device_upload = masking.masked_upload(
            torch.from_numpy(values[step, cid]), codec, client_id=cid, self_seed=self_seeds[-1],
            pair_step_seeds=pair_seeds, rounding_key=rounding_key)
        uploads[cid] = device_upload
        host = masking.to_numpy_ring(device_upload, codec)
        assert np.array_equal(host, reply.vector)
        # the server receives the device-built upload in place of the numpy one
        replies[cid] = MaskedInput(sid, cid, step, host, reply.envelopes).encode()
    consistency = server.receive(replies)
    share_requests = server.receive({c: clients[c].handle(r) for c, r in consistency.items()})
    outcome = server.receive({c: clients[c].handle(r) for c, r in share_requests.items()})
    assert outcome.included == frozenset(range(n))
    plain = values[step].astype(np.float64).sum(0)
    assert np.max(np.abs(outcome.total - plain)) <= codec.error_bound(n) + 4 * 0.2  # 0.2 clipped
    # the masks cancel in the device ring sum as well, up to the self masks
    total = masking.ring_sum(list(uploads.values()), codec)
    self_masks = masking.mask_vector(torch.zeros_like(total), codec, self_seed=None,
                                     pair_seeds={s: -1 for s in self_seeds[-n:]})
    unmasked = masking.ring_sum([total, self_masks], codec)
    assert np.array_equal(masking.to_numpy_ring(unmasked, codec), outcome.ring_total)
    decoded = masking.decode_sum(unmasked, codec, n_summed=n)
    assert np.array_equal(decoded.numpy(), codec.decode_sum(outcome.ring_total, n_summed=n))
    # the server's whole side in one call: sum, self-mask removal, decoding (float32)
    server_side = masking.unmask_sum(list(uploads.values()), codec, n_summed=n,
                                     mask_seeds={s: -1 for s in self_seeds[-n:]})
    want = codec.decode_sum(outcome.ring_total, n_summed=n).astype(np.float32)
    assert server_side.dtype == torch.float32 and np.array_equal(server_side.numpy(), want)


def test_noise_is_added_before_the_masks_modulo_the_ring():
    codec = FixedPointCodec.for_clients(2, clip=1.0, ring_bits=20, rounding="nearest",
                                        prg="chacha20")
    x = torch.linspace(-1, 1, 301)
    noise = torch.randint(-(1 << 40), 1 << 40, (301,), dtype=torch.int64)
    args = dict(client_id=0, self_seed=bytes(32), pair_step_seeds={1: bytes([1]) * 32},
                rounding_key=None)
    plain = masking.masked_upload(x, codec, **args)
    noisy = masking.masked_upload(x, codec, noise=noise, **args)
    expected = (plain.to(torch.int64) + noise) & ((1 << 20) - 1)
    assert torch.equal(noisy.to(torch.int64), expected)


def test_a_client_has_no_pair_mask_with_itself():
    codec = FixedPointCodec.for_clients(2, clip=1.0, prg="chacha20")
    with pytest.raises(Exception, match="itself"):
        masking.masked_upload(torch.zeros(4), codec, client_id=0, self_seed=bytes(32),
                              pair_step_seeds={0: bytes(32)}, rounding_key=bytes(32))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_encode_and_mask_equal_the_cpu():
    codec = FixedPointCodec.for_clients(4, clip=1.0, ring_bits=32, rounding="stochastic",
                                        prg="chacha20")
    x = torch.from_numpy(awkward_vector(1 << 16, 3, 1.0))
    seeds = {1: os.urandom(32), 3: os.urandom(32)}
    args = dict(client_id=2, self_seed=bytes(32), pair_step_seeds=seeds, rounding_key=bytes(32))
    cpu = masking.masked_upload(x, codec, **args)
    gpu = masking.masked_upload(x.cuda(), codec, **args)
    assert torch.equal(cpu, gpu.cpu())


def test_to_numpy_ring_gives_the_protocols_view_of_a_cpu_vector():
    codec = FixedPointCodec.for_clients(4, clip=1.0, ring_bits=32, prg="chacha20")
    ring = torch.tensor([-1, 0, 7], dtype=torch.int32)
    for pinned in (True, False):  # no CUDA: pinning does not apply
        out = masking.to_numpy_ring(ring, codec, pinned=pinned)
        assert out.dtype == np.uint32 and out.tolist() == [2**32 - 1, 0, 7]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_downloads_into_pinned_buffers_that_are_never_shared():
    codec = FixedPointCodec.for_clients(4, clip=1.0, ring_bits=32, prg="chacha20")
    first = torch.arange(1 << 20, dtype=torch.int32, device="cuda")
    a = masking.to_numpy_ring(first, codec)
    b = masking.to_numpy_ring(first + 5, codec)  # while a is alive: its own block
    assert torch.from_numpy(a.view(np.int32)).is_pinned()  # asks CUDA about the pointer
    np.testing.assert_array_equal(a.view(np.int32), np.arange(1 << 20, dtype=np.int32))
    np.testing.assert_array_equal(b.view(np.int32), np.arange(1 << 20, dtype=np.int32) + 5)
    pageable = masking.to_numpy_ring(first, codec, pinned=False)
    np.testing.assert_array_equal(pageable, a)
    assert not torch.from_numpy(pageable.view(np.int32)).is_pinned()


def test_a_codec_with_another_prg_is_refused():
    codec = FixedPointCodec.for_clients(2, clip=1.0)  # AES-256-CTR: the device cannot match it
    with pytest.raises(ConfigError, match="prg='chacha20'"):
        masking.encode(torch.zeros(4), codec, rounding_key=bytes(32))


TRITON_HERE = "triton" in available_backends("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.triton
@pytest.mark.skipif(not TRITON_HERE, reason="needs triton on CUDA, or TRITON_INTERPRET=1 here")
@pytest.mark.parametrize("ring_bits", [16, 24, 32])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fused_kernel_equals_the_unfused_upload(ring_bits, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    codec = FixedPointCodec.for_clients(4, clip=2.0, ring_bits=ring_bits, rounding="stochastic",
                                        prg="chacha20")
    m = 2 * 1024 + 37  # several programs and a partial block
    x = torch.from_numpy(awkward_vector(m, ring_bits, 2.0, dtype)).to(device)
    args = dict(client_id=1, self_seed=os.urandom(32), rounding_key=os.urandom(32),
                pair_step_seeds={0: os.urandom(32), 2: os.urandom(32), 3: os.urandom(32)})
    noise = torch.from_numpy(np.random.default_rng(1).integers(-50, 50, m)).to(device)
    for extra in ({}, {"noise": noise}):
        unfused = masking.masked_upload(x, codec, backend="torch", **args, **extra)
        fused = masking.masked_upload(x, codec, backend="triton", fused=True, **args, **extra)
        assert fused.dtype == unfused.dtype and torch.equal(fused.cpu(), unfused.cpu())


@pytest.mark.triton
@pytest.mark.skipif(not TRITON_HERE, reason="needs triton on CUDA, or TRITON_INTERPRET=1 here")
def test_fused_flag_falls_back_where_the_kernel_does_not_apply():
    codec = FixedPointCodec.for_clients(2, clip=1.0, ring_bits=40, rounding="stochastic",
                                        prg="chacha20")  # a 40-bit ring needs 64-bit lanes
    # on the device triton runs on: CUDA, or the CPU under TRITON_INTERPRET=1
    x = torch.from_numpy(awkward_vector(100, 3, 1.0)).to(
        "cuda" if torch.cuda.is_available() else "cpu")
    args = dict(client_id=0, self_seed=bytes(32), pair_step_seeds={1: bytes(range(32))},
                rounding_key=bytes(32))
    assert torch.equal(masking.masked_upload(x, codec, backend="triton", fused=True, **args),
                       masking.masked_upload(x, codec, backend="torch", **args))
    codec = FixedPointCodec.for_clients(20, clip=1.0, ring_bits=32, rounding="stochastic",
                                        prg="chacha20")
    many = {p: os.urandom(32) for p in range(1, masking.MAX_FUSED_MASKS + 1)}  # + self mask
    args.update(pair_step_seeds=many)
    assert torch.equal(masking.masked_upload(x, codec, backend="triton", fused=True, **args),
                       masking.masked_upload(x, codec, backend="torch", **args))


def test_unmask_sum_refuses_mismatched_uploads():
    codec = FixedPointCodec.for_clients(3, clip=1.0, ring_bits=32, prg="chacha20")
    good = torch.zeros(8, dtype=torch.int32)
    for uploads in ([], [good, torch.zeros(9, dtype=torch.int32)], [good, good.float()]):
        with pytest.raises(ConfigError, match="ring vectors"):
            masking.unmask_sum(uploads, codec, mask_seeds={bytes(32): -1}, n_summed=2)
    with pytest.raises(ConfigError, match="\\+1 or -1"):
        masking.unmask_sum([good], codec, mask_seeds={bytes(32): 2}, n_summed=1)


@pytest.mark.triton
@pytest.mark.skipif(not TRITON_HERE, reason="needs triton on CUDA, or TRITON_INTERPRET=1 here")
@pytest.mark.parametrize(("ring_bits", "n"), [(16, 4), (24, 4), (32, 4), (32, 17)])
def test_fused_unmask_sum_equals_the_unfused_server_side(ring_bits, n):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    codec = FixedPointCodec.for_clients(n, clip=2.0, ring_bits=ring_bits, rounding="stochastic",
                                        prg="chacha20")
    m = 2 * 1024 + 37  # several programs and a partial block
    rng = np.random.default_rng(ring_bits)
    uploads = [torch.from_numpy(rng.integers(0, 1 << ring_bits, m).astype(np.uint32)
                                .view(np.int32)).to(device) for _ in range(n)]
    seeds = {os.urandom(32): -1, os.urandom(32): -1, os.urandom(32): 1}  # a dropout's pair mask
    fused = masking.unmask_sum(uploads, codec, mask_seeds=seeds, n_summed=n, backend="triton")
    unfused = masking.unmask_sum(uploads, codec, mask_seeds=seeds, n_summed=n, backend="torch")
    assert fused.dtype == torch.float32 and torch.equal(fused.cpu(), unfused.cpu())
    assert bool((fused.abs() <= math.ldexp(1.0, ring_bits - 1 - codec.scale_bits)).all())


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 5), m=st.integers(1, 300),
       ring_bits=st.sampled_from([8, 16, 24, 31, 32, 40, 64]))
def test_unmask_sum_equals_the_numpy_server_arithmetic(data, n, m, ring_bits):
    # the server's side against the protocol's numpy reference: ring sum of the uploads, plus
    # sign * uniform_ring(seed, chacha20) for each rebuilt mask, decoded by the codec (float32)
    codec = FixedPointCodec.for_clients(n, clip=1.0, ring_bits=ring_bits, prg="chacha20")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    uploads = [rng.integers(0, 2**ring_bits, m, dtype=np.uint64).astype(codec.dtype)
               for _ in range(n)]
    signs = data.draw(st.lists(st.sampled_from([1, -1]), min_size=1, max_size=6))
    seeds = {rng.bytes(32): sign for sign in signs}
    want = codec.sum(uploads)
    for seed, sign in seeds.items():
        mask = prg.uniform_ring(seed, m, ring_bits=ring_bits, algorithm="chacha20")
        want = codec.add(want, mask) if sign > 0 else codec.sub(want, mask)
    decoded = codec.decode_sum(want, n_summed=n).astype(np.float32)
    device = [torch.from_numpy(u.view(np.int32 if ring_bits <= 32 else np.int64)) for u in uploads]
    got = masking.unmask_sum(device, codec, mask_seeds=seeds, n_summed=n, backend="torch")
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), decoded)
