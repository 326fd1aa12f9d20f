"""Quantise and mask a client's vector on its device, bit-identical to the SecAgg CPU client.

With a session whose PRG is ChaCha20, `masked_upload` returns exactly the ring vector that
`protocols.secagg.client.SecAggClient` uploads for the same input and the same per-step keys:

    encoded = codec.encode(x, rounding_key=rounding_key)        # dither: keystream of rounding_key
    masked  = encoded + PRG(self_seed) + sum_peers sign(own, peer) * PRG(pair_step_seed)  mod 2^k

where rounding_key = derive_key(rounding_seed, session_id=b"rounding",
purpose="stochastic-rounding", context=(step,)), pair_step_seed = keys.pair_step_seed(pair
master key, session_id, step), self_seed is the client's fresh 32 bytes of the step, sign is
+1 when own id < peer id, and PRG(key) is prg.uniform_ring(key, m, ring_bits=k,
algorithm="chacha20") with the all-zero nonce. Nothing here derives or stores keys: the caller
passes the step's seeds, so the protocol's key schedule stays in one place.

The one place the device may differ from numpy: a GPU that flushes subnormal float32 inputs to
zero. Only |x| < 2^-126 is affected, and such values encode to 0 or 1 unit either way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from codream_secure.dreams import NonFiniteGradientError
from codream_secure.errors import ConfigError
from codream_secure.gpu import chacha20
from protocols.codec import FixedPointCodec
from protocols.secagg.client import StepSecrets
from protocols.secagg.keys import pair_sign

__all__ = [
    "decode_sum",
    "encode",
    "mask_vector",
    "masked_upload",
    "protocol_masker",
    "protocol_unmasker",
    "ring_dtype",
    "ring_sum",
    "to_numpy_ring",
    "unmask_sum",
]


# The fused kernels are compiled once per mask count; counts above this (SecAgg+ neighbourhoods
# beyond 16) take the unfused path, which no GPU has timed against the fused one at such sizes.
MAX_FUSED_MASKS = 16


def ring_dtype(codec: FixedPointCodec) -> torch.dtype:
    """int32 lanes for ring_bits <= 32, else int64 (the bit patterns of uint32/uint64)."""
    return torch.int32 if codec.ring_bits <= 32 else torch.int64


def _reduce(values: torch.Tensor, ring_bits: int) -> torch.Tensor:
    # int32/int64 adds wrap modulo 2^32/2^64, and 2^k divides both, so reducing once at the
    # end equals reducing after every operation.
    return values if ring_bits in (32, 64) else values & ((1 << ring_bits) - 1)


def _work_dtype(x: torch.Tensor, codec: FixedPointCodec) -> torch.dtype:
    """float32 exactly when protocols.codec would use it: narrow input and a float32 clip."""
    f32_clip = float(np.float32(codec.clip)) == codec.clip
    return torch.float32 if x.element_size() <= 4 and f32_clip else torch.float64


def _uniform(words: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """Uniforms in [0, 1) from 32-bit keystream words, exactly as the numpy codec makes them."""
    if work == torch.float32:
        # 23 random mantissa bits under the exponent of 1.0 give [1, 2); >> is arithmetic on
        # int32, so mask the 23 bits after shifting.
        bits = ((words >> 9) & 0x7FFFFF) | 0x3F800000
        return bits.view(torch.float32) - 1.0
    return (words.to(torch.int64) & 0xFFFFFFFF).to(torch.float64) * 2.0**-32


def _require_chacha(codec: FixedPointCodec) -> None:
    """The device expands ChaCha20 only: any other session PRG would give different uploads."""
    if codec.prg != "chacha20":
        raise ConfigError(f"device masking expands ChaCha20 keystreams; this codec's PRG is "
                          f"{codec.prg!r} (open the session with prg='chacha20')")


def _flat_input(x: torch.Tensor, codec: FixedPointCodec, check_finite: bool) -> torch.Tensor:
    if not x.is_floating_point() or x.element_size() > 8:
        raise ConfigError(f"encode takes a floating point tensor, got {x.dtype}")
    _require_chacha(codec)
    flat = x.detach().reshape(-1)
    if check_finite and not bool(torch.isfinite(flat).all()):
        bad = int((~torch.isfinite(flat)).sum())
        raise NonFiniteGradientError(f"input holds {bad} non-finite value(s) (NaN or inf)")
    return flat


def _encode_flat(flat: torch.Tensor, codec: FixedPointCodec,
                 dither: torch.Tensor | None) -> torch.Tensor:
    """The codec's encoding of a checked flat vector; `dither` holds its keystream words."""
    work = _work_dtype(flat, codec)
    scaled = flat.to(work) * math.ldexp(1.0, codec.scale_bits)  # exact: a power of two
    limit = math.ldexp(codec.clip, codec.scale_bits)
    scaled = scaled.clamp(-limit, limit)  # a float32 overflow to inf clips to the limit too
    out_dtype = ring_dtype(codec)
    if codec.rounding == "nearest":
        q = torch.round(scaled).to(out_dtype)  # round half to even, as numpy.rint
    else:
        floor = torch.floor(scaled)
        up = _uniform(dither, work) < scaled - floor
        q = floor.to(out_dtype) + up.to(out_dtype)
    # |q| <= ceil(clip 2^f) < 2^(k-1): the casts were exact; two's complement is the residue.
    return _reduce(q, codec.ring_bits)


def _dither_key(codec: FixedPointCodec, rounding_key: bytes | None) -> bytes | None:
    if codec.rounding == "nearest":
        return None
    return os.urandom(chacha20.KEY_BYTES) if rounding_key is None else rounding_key


def encode(
    x: torch.Tensor, codec: FixedPointCodec, *, rounding_key: bytes | None = None,
    check_finite: bool = True, backend: str = "auto",
) -> torch.Tensor:
    """Flat ring vector of clip(x) * 2^f rounded, equal to codec.encode(x) with the ChaCha20 PRG.

    Stochastic rounding takes element i's uniform from keystream word i of rounding_key (fresh
    random when None, as in the codec). `check_finite` syncs with the device to refuse NaN/inf.
    """
    flat = _flat_input(x, codec, check_finite)
    key = _dither_key(codec, rounding_key)
    dither = None if key is None else chacha20.keystream_words(
        [key], flat.numel(), device=flat.device, backend=backend)[0]
    return _encode_flat(flat, codec, dither)


def _signed_seeds(self_seed: bytes | None,
                  pair_seeds: Mapping[bytes, int]) -> tuple[list[bytes], list[int]]:
    seeds = ([] if self_seed is None else [self_seed]) + list(pair_seeds)
    signs = ([1] if self_seed is not None else []) + [pair_seeds[s] for s in pair_seeds]
    _check_signs(signs)
    return seeds, signs


def _check_signs(signs: Sequence[int]) -> None:
    if any(s not in (1, -1) for s in signs):
        raise ConfigError("pair mask signs must be +1 or -1")


def _add_masks(encoded: torch.Tensor, masks: torch.Tensor | None, signs: list[int],
               codec: FixedPointCodec) -> torch.Tensor:
    total = encoded.clone()
    if masks is None:
        return total
    for row, sign in zip(masks, signs, strict=True):  # wrapping adds: one pass per mask
        if sign > 0:
            total.add_(row)
        else:
            total.sub_(row)
    return _reduce(total, codec.ring_bits)


def mask_vector(
    encoded: torch.Tensor, codec: FixedPointCodec, *, self_seed: bytes | None,
    pair_seeds: Mapping[bytes, int], backend: str = "auto",
) -> torch.Tensor:
    """encoded + PRG(self_seed) + sum sign * PRG(seed) mod 2^k; pair_seeds maps seed -> +1/-1.

    The keystreams come from batched ChaCha20 calls of up to MAX_FUSED_MASKS keys each.
    """
    _require_chacha(codec)
    seeds, signs = _signed_seeds(self_seed, pair_seeds)
    return _add_keystreams(encoded, seeds, signs, codec, backend)


def _add_keystreams(total: torch.Tensor, seeds: Sequence[bytes], signs: Sequence[int],
                    codec: FixedPointCodec, backend: str) -> torch.Tensor:
    """A new tensor: total + sum sign * PRG(seed) mod 2^k, expanding at most MAX_FUSED_MASKS
    keystreams at a time (a large SecAgg+ dropout set never holds every mask at once)."""
    _check_signs(signs)
    if not seeds:
        return _add_masks(total, None, [], codec)
    for start in range(0, len(seeds), MAX_FUSED_MASKS):
        masks = chacha20.uniform_ring(list(seeds[start:start + MAX_FUSED_MASKS]), total.numel(),
                                      ring_bits=codec.ring_bits, device=total.device,
                                      backend=backend)
        total = _add_masks(total, masks, list(signs[start:start + MAX_FUSED_MASKS]), codec)
    return total


def masked_upload(
    x: torch.Tensor, codec: FixedPointCodec, *, client_id: int, self_seed: bytes,
    pair_step_seeds: Mapping[int, bytes], rounding_key: bytes | None,
    noise: torch.Tensor | None = None, check_finite: bool = True, backend: str = "auto",
    fused: bool = True,
) -> torch.Tensor:
    """The ring vector SecAggClient uploads at one step (ChaCha20 PRG), computed on x's device.

    pair_step_seeds maps each active peer id to keys.pair_step_seed(...) of this step. `noise`
    (int64 fixed-point units, distributed DP) is added to the encoding before masking, as the
    client adds its RingNoise sample; bounding it is the sampler's job, as on the CPU. With a
    ring of at most 32 bits the dither and every mask come from one ChaCha20 launch. Where the
    fused kernel applies (Triton backend, float32 work, stochastic rounding, ring <= 32 bits, at
    most MAX_FUSED_MASKS masks) it encodes and masks in that same launch, bit-identically;
    `fused=False` forces the unfused path.
    """
    if client_id in pair_step_seeds:
        raise ConfigError("a client has no pair mask with itself")
    signed = {seed: pair_sign(client_id, peer) for peer, seed in pair_step_seeds.items()}
    if len(signed) != len(pair_step_seeds):
        raise ConfigError("two peers share one pair seed")
    flat = _flat_input(x, codec, check_finite)
    seeds, signs = _signed_seeds(self_seed, signed)
    key = _dither_key(codec, rounding_key)
    m = flat.numel()
    if fused and _fusable(flat, codec, key, len(seeds), backend):
        upload = _fused_upload(flat, codec, [key, *seeds], signs)
        return upload if noise is None else _add_noise(upload, noise, codec)
    if key is not None and codec.ring_bits <= 32:
        rows = chacha20.keystream_words([key, *seeds], m, device=flat.device, backend=backend)
        dither, masks = rows[0], _reduce(rows[1:], codec.ring_bits)
    else:
        dither = None if key is None else chacha20.keystream_words(
            [key], m, device=flat.device, backend=backend)[0]
        masks = chacha20.uniform_ring(seeds, m, ring_bits=codec.ring_bits, device=flat.device,
                                      backend=backend)
    encoded = _encode_flat(flat, codec, dither)
    if noise is not None:
        encoded = _add_noise(encoded, noise, codec)
    return _add_masks(encoded, masks, signs, codec)


def _add_noise(ring: torch.Tensor, noise: torch.Tensor, codec: FixedPointCodec) -> torch.Tensor:
    if noise.dtype != torch.int64 or noise.shape != ring.shape:
        raise ConfigError(f"noise must be {ring.numel()} int64 values")
    # int64 -> int32 keeps the low 32 bits: the ring residue of the signed noise. Ring additions
    # commute, so adding it after the masks gives the same upload as adding it before.
    return _reduce(ring + noise.to(ring.device, ring.dtype), codec.ring_bits)


def _fusable(flat: torch.Tensor, codec: FixedPointCodec, dither_key: bytes | None,
             n_masks: int, backend: str) -> bool:
    """The fused kernel covers the default CoDream case: float32, stochastic, ring <= 32."""
    return (dither_key is not None and codec.ring_bits <= 32 and n_masks <= MAX_FUSED_MASKS
            and _work_dtype(flat, codec) == torch.float32
            and chacha20.resolve_backend(backend, flat.device) == "triton")


def _fused_upload(flat: torch.Tensor, codec: FixedPointCodec, keys: list[bytes],
                  signs: list[int]) -> torch.Tensor:
    from codream_secure.gpu._chacha20_triton import fused_masked_upload

    blocks = -(-flat.numel() // chacha20.BLOCK_WORDS)
    key_words, nonce_words = chacha20.key_tensors(
        keys, [bytes(chacha20.NONCE_BYTES)] * len(keys), blocks, flat.device)
    return fused_masked_upload(flat.to(torch.float32), key_words, nonce_words,
                               chacha20.host_to_device(np.array(signs, np.int32), flat.device),
                               scale=math.ldexp(1.0, codec.scale_bits),
                               limit=math.ldexp(codec.clip, codec.scale_bits),
                               ring_bits=codec.ring_bits)


def ring_sum(vectors: Sequence[torch.Tensor], codec: FixedPointCodec) -> torch.Tensor:
    """Ring sum of equally shaped ring vectors."""
    if not vectors or any(v.dtype != ring_dtype(codec) for v in vectors):
        raise ConfigError(f"ring_sum needs one or more {ring_dtype(codec)} ring vectors")
    total = vectors[0].clone()
    for row in vectors[1:]:
        total.add_(row)
    return _reduce(total, codec.ring_bits)


def decode_sum(total: torch.Tensor, codec: FixedPointCodec, *, n_summed: int) -> torch.Tensor:
    """Signed reading of an unmasked ring sum of n_summed encodings, / 2^f (float64 on device).

    Equals codec.decode_sum for the same ring vector.
    """
    codec.check_budget(n_summed)
    k = codec.ring_bits
    width = 32 if k <= 32 else 64
    signed = total if k == width else (total << (width - k)) >> (width - k)  # sign-extend
    return signed.to(torch.float64) * math.ldexp(1.0, -codec.scale_bits)


def unmask_sum(uploads: Sequence[torch.Tensor], codec: FixedPointCodec, *,
               mask_seeds: Mapping[bytes, int], n_summed: int, backend: str = "auto",
               fused: bool = True) -> torch.Tensor:
    """The server's result on the device: decode(ring sum + sum sign * PRG(seed)), float32.

    `mask_seeds` maps each mask the server rebuilt to its sign: -1 for a survivor's self mask,
    +1/-1 for a dropped client's pair masks (minus what its partners added). Equals
    decode_sum(mask_vector(ring_sum(uploads), ...)) rounded once to float32. Where the fused
    kernel applies (Triton, ring <= 32 bits, 1 to MAX_FUSED_MASKS masks) it is one launch.
    """
    if not uploads or any(u.dtype != ring_dtype(codec) or u.shape != uploads[0].shape
                          for u in uploads):
        raise ConfigError(f"unmask_sum needs equally shaped {ring_dtype(codec)} ring vectors")
    _require_chacha(codec)
    codec.check_budget(n_summed)
    seeds, signs = _signed_seeds(None, mask_seeds)
    device = uploads[0].device
    if (fused and codec.ring_bits <= 32 and 0 < len(seeds) <= MAX_FUSED_MASKS
            and chacha20.resolve_backend(backend, device) == "triton"):
        from codream_secure.gpu._chacha20_triton import fused_unmask_sum

        stacked = torch.stack([u.reshape(-1) for u in uploads])
        blocks = -(-stacked.shape[1] // chacha20.BLOCK_WORDS)
        key_words, nonce_words = chacha20.key_tensors(
            seeds, [bytes(chacha20.NONCE_BYTES)] * len(seeds), blocks, device)
        sign_words = chacha20.host_to_device(np.array(signs, np.int32), device)
        return fused_unmask_sum(stacked, key_words, nonce_words, sign_words,
                                inv_scale=math.ldexp(1.0, -codec.scale_bits),
                                ring_bits=codec.ring_bits)
    total = mask_vector(ring_sum(uploads, codec), codec, self_seed=None, pair_seeds=mask_seeds,
                        backend=backend)
    return decode_sum(total, codec, n_summed=n_summed).to(torch.float32)


def to_numpy_ring(vector: torch.Tensor, codec: FixedPointCodec, *,
                  pinned: bool = True) -> np.ndarray:
    """The protocol's uint32/uint64 numpy view of a device ring vector (copies to the host).

    From CUDA the copy lands in pinned memory from torch's caching host allocator (`pinned`):
    a DMA into a block reused once this array is freed, where pageable memory is mapped afresh
    (page faults) and staged by the driver. Each call returns its own buffer either way.
    """
    vector = vector.detach()
    if pinned and vector.device.type == "cuda":
        host = torch.empty(vector.shape, dtype=vector.dtype, pin_memory=True)
        host.copy_(vector)  # synchronous: the array is complete when returned
    else:
        host = vector.cpu()
    return host.numpy().view(codec.dtype)


def protocol_unmasker(device: torch.device | str, *, backend: str = "auto"):
    """A SecAggServer unmasker: the uploads' ring sum and the rebuilt masks, computed on `device`.

    Pass it as SecAggServer(..., unmasker=...) (or SecAggSession(unmasker=...)) in a session
    whose PRG is ChaCha20; its ring total equals `protocols.secagg.server.host_unmask`'s bit for
    bit. The uploads (the messages the server received) go to the device, every mask is one
    batched keystream there, and only the ring total comes back; decoding stays the server's.
    """
    target = torch.device(device)

    def unmask(uploads: Sequence[np.ndarray], signed_seeds: Sequence[tuple[bytes, int]],
               codec: FixedPointCodec) -> np.ndarray:
        _require_chacha(codec)
        if any(np.asarray(u).dtype != codec.dtype for u in uploads):
            raise ConfigError(f"the unmasker takes {codec.dtype} ring vectors")
        vectors = [_received_on(np.asarray(u), ring_dtype(codec), target) for u in uploads]
        total = _add_keystreams(ring_sum(vectors, codec), [seed for seed, _ in signed_seeds],
                                [sign for _, sign in signed_seeds], codec, backend)
        return to_numpy_ring(total, codec)

    return unmask


def _received_on(vector: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A received ring vector on `device`: one host copy (messages are read-only buffers), into
    pinned memory for CUDA so the upload to the device does not wait on its queue."""
    staged = torch.empty(vector.shape, dtype=dtype, pin_memory=device.type == "cuda")
    staged.numpy().view(vector.dtype)[...] = vector
    return staged.to(device, non_blocking=True)


def protocol_masker(*, backend: str = "auto", fused: bool = True, check_finite: bool = True,
                    pinned: bool = True):
    """A SecAggClient masker: the client derives the keys, the upload is built on x's device.

    Pass it as SecAggClient(..., masker=protocol_masker()) (or SecAggSession(maskers=...)) in a
    session whose PRG is ChaCha20; the upload equals the numpy client's bit for bit. It is built
    in one Triton launch where masked_upload can (bit-identical); `fused=False` never does.
    `check_finite=False` skips the NaN/inf refusal (one device sync per upload) for a caller
    that has already refused non-finite vectors, as `federation.AggregationChannel` does.
    `pinned=False` downloads a CUDA upload into pageable memory (to_numpy_ring).
    """

    def mask(vector: object, codec: FixedPointCodec, secrets: StepSecrets) -> np.ndarray:
        x = vector if torch.is_tensor(vector) else torch.from_numpy(np.asarray(vector))
        x = x.reshape(-1)
        noise = None if secrets.noise is None else torch.from_numpy(secrets.noise).to(x.device)
        upload = masked_upload(x, codec, client_id=secrets.client_id, self_seed=secrets.self_seed,
                               pair_step_seeds=secrets.pair_seeds,
                               rounding_key=secrets.rounding_key, noise=noise, backend=backend,
                               fused=fused, check_finite=check_finite)
        return to_numpy_ring(upload, codec, pinned=pinned)

    return mask
