"""Fixed-point codec: budget boundary, ring wrap-around, rounding semantics, error bound."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import codec as codec_module
from protocols.codec import FixedPointCodec
from protocols.errors import (
    MalformedMessageError,
    NonFiniteInputError,
    OverflowBudgetError,
    ParameterError,
)
from protocols.primitives import prg

KEY = bytes(range(32))
RING_BITS = [8, 16, 32, 64]


# ---- parameters and budget ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("clip", dict(clip=0.0)),
        ("clip", dict(clip=-1.0)),
        ("clip", dict(clip=math.nan)),
        ("clip", dict(clip=math.inf)),
        ("clip", dict(clip="1")),
        ("clip", dict(clip=True)),
        ("scale_bits", dict(scale_bits=-1)),
        ("scale_bits", dict(scale_bits=1.5)),
        ("scale_bits", dict(scale_bits=127)),
        ("scale_bits", dict(scale_bits=True)),
        ("ring_bits", dict(ring_bits=7)),
        ("ring_bits", dict(ring_bits=65)),
        ("ring_bits", dict(ring_bits=32.0)),
        ("rounding", dict(rounding="floor")),
    ],
)
def test_invalid_fields_are_refused_by_name(field, kwargs):
    params = dict(clip=1.0, scale_bits=8, ring_bits=32, rounding="nearest") | kwargs
    with pytest.raises(ParameterError, match=field):
        FixedPointCodec(**params)


def test_a_codec_that_cannot_hold_one_value_is_refused():
    with pytest.raises(OverflowBudgetError):
        FixedPointCodec(clip=1.0, scale_bits=31)  # ceil(2^31) + 1 > 2^31 - 1


@pytest.mark.parametrize(
    ("ring_bits", "clip", "scale_bits", "n_max"),
    [
        # 2^7 - 1 = 127 = 1 * (126 + 1)
        (8, 126.0, 0, 1),
        # 2^15 - 1 = 32767 = 217 * 151 = 217 * (ceil(9.375 * 2^4) + 1)
        (16, 9.375, 4, 217),
        # 2^31 - 1 is prime: only n = 1 can meet it exactly, with ceil(R 2^f) = 2^31 - 2
        (32, (2**31 - 2) / 2**20, 20, 1),
        # 2^63 - 1 = 7^2 * 73 * 127 * 337 * 92737 * 649657; 127 * (ceil(R 2^f) + 1) = 2^63 - 1
        (64, ((2**63 - 1) // 127 - 1) / 2**40, 40, 127),
    ],
)
def test_budget_accepts_the_exact_boundary_and_refuses_one_more(ring_bits, clip, scale_bits, n_max):
    assert n_max * (math.ceil(Fraction(clip) * 2**scale_bits) + 1) == 2 ** (ring_bits - 1) - 1
    codec = FixedPointCodec.for_clients(
        n_max, clip=clip, scale_bits=scale_bits, ring_bits=ring_bits
    )
    codec.check_budget(n_max)
    assert codec.max_clients() == n_max
    with pytest.raises(OverflowBudgetError):
        codec.check_budget(n_max + 1)
    with pytest.raises(OverflowBudgetError):
        FixedPointCodec.for_clients(
            n_max + 1, clip=clip, scale_bits=scale_bits, ring_bits=ring_bits
        )
    # the smallest larger clip crosses a quantum and breaks the budget even for n_max clients
    with pytest.raises(OverflowBudgetError):
        FixedPointCodec.for_clients(
            n_max, clip=math.nextafter(clip, math.inf), scale_bits=scale_bits, ring_bits=ring_bits
        )


def test_worst_case_sum_at_the_boundary_decodes_without_wrapping():
    codec = FixedPointCodec.for_clients(217, clip=9.375, scale_bits=4, ring_bits=16)
    for sign in (1.0, -1.0):
        worst = codec.encode(np.full(3, sign * 1e9, dtype=np.float32), rounding_key=KEY)
        total = codec.sum([worst] * 217)
        np.testing.assert_array_equal(codec.decode_sum(total, n_summed=217), sign * 217 * 9.375)


def test_refusal_names_the_parameters_and_what_would_fit():
    with pytest.raises(OverflowBudgetError) as info:
        FixedPointCodec.for_clients(100, clip=1.0, scale_bits=25)
    message = str(info.value)
    for fragment in ("n=100", "clip=1.0", "scale_bits=25", "ring_bits=32", "at most 63 clients",
                     "scale_bits <= 24", "ring_bits >= 33"):
        assert fragment in message
    with pytest.raises(OverflowBudgetError, match="n=3000000000"):
        FixedPointCodec.for_clients(3 * 10**9, clip=1.0)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 10**6),
    st.floats(1e-6, 1e6, allow_nan=False),
    st.sampled_from([*RING_BITS, 12, 40]),
)
def test_derived_scale_bits_is_the_largest_that_fits(n, clip, ring_bits):
    limit = 2 ** (ring_bits - 1) - 1

    def fits(f: int) -> bool:
        return n * (math.ceil(Fraction(clip) * 2**f) + 1) <= limit

    if not fits(0):
        with pytest.raises(OverflowBudgetError):
            FixedPointCodec.for_clients(n, clip=clip, ring_bits=ring_bits)
        return
    codec = FixedPointCodec.for_clients(n, clip=clip, ring_bits=ring_bits)
    assert fits(codec.scale_bits)
    assert codec.scale_bits == codec_module.MAX_SCALE_BITS or not fits(codec.scale_bits + 1)
    assert codec.max_clients() >= n


def test_budget_counts_clients_not_arguments_of_other_kinds():
    codec = FixedPointCodec.for_clients(10, clip=1.0)
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(ParameterError):
            codec.check_budget(bad)


# ---- ring arithmetic ---------------------------------------------------------------------------


def _ring_values(ring_bits: int, size: int, seed: int) -> np.ndarray:
    return prg.uniform_ring(bytes([seed]) * 32, size, ring_bits=ring_bits)


@pytest.mark.parametrize("ring_bits", RING_BITS)
def test_add_sub_sum_wrap_like_integers_mod_2k(ring_bits):
    codec = FixedPointCodec(clip=1.0, scale_bits=0, ring_bits=ring_bits)
    modulus = 1 << ring_bits
    a, b, c = (_ring_values(ring_bits, 257, seed) for seed in (1, 2, 3))
    # force the extreme cases into the vectors
    a[:3] = [codec.mask, 0, codec.mask]
    b[:3] = [1, 1, codec.mask]
    ai, bi, ci = (list(map(int, v)) for v in (a, b, c))
    assert codec.add(a, b).tolist() == [(x + y) % modulus for x, y in zip(ai, bi, strict=True)]
    assert codec.sub(a, b).tolist() == [(x - y) % modulus for x, y in zip(ai, bi, strict=True)]
    expected = [(x + y + z) % modulus for x, y, z in zip(ai, bi, ci, strict=True)]
    assert codec.sum([a, b, c]).tolist() == expected
    assert codec.add(a, b)[0] == 0 and codec.sub(b, a)[1] == 1
    assert codec.sum([a]) is not a
    assert codec.modulus == modulus and codec.mask == modulus - 1


def test_ring_operations_refuse_foreign_arrays():
    codec = FixedPointCodec(clip=1.0, scale_bits=0, ring_bits=16)
    ok = np.zeros(4, dtype=np.uint32)
    for bad in (np.zeros(4, dtype=np.uint64), np.zeros(4, dtype=np.int32), [0, 0, 0, 0]):
        with pytest.raises(ParameterError):
            codec.add(ok, bad)
        with pytest.raises(ParameterError):
            codec.sub(bad, ok)
    with pytest.raises(ParameterError):
        codec.sum([])
    with pytest.raises(ParameterError):
        codec.sum([ok, np.zeros(5, dtype=np.uint32)])


# ---- encoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ring_bits", RING_BITS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_twos_complement_layout(ring_bits, rounding):
    codec = FixedPointCodec(clip=4.0, scale_bits=3, ring_bits=ring_bits, rounding=rounding)
    x = np.array([0.0, 0.125, -0.125, 4.0, -4.0, 1e30, -1e30], dtype=np.float64)
    expected = [0, 1, codec.mask, 32, codec.modulus - 32, 32, codec.modulus - 32]
    assert codec.encode(x, rounding_key=KEY).tolist() == expected
    assert codec.encode(x, rounding_key=KEY).dtype == codec.dtype
    decoded = codec.decode_sum(codec.encode(x, rounding_key=KEY), n_summed=1)
    np.testing.assert_array_equal(decoded, np.clip(x, -4.0, 4.0))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_any_shape_becomes_a_flat_c_order_vector(dtype):
    codec = FixedPointCodec(clip=8.0, scale_bits=4, rounding="nearest")
    x = (np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 4 - 3).astype(dtype)
    fortran = np.asfortranarray(x)
    expected = codec.encode(x.reshape(-1))
    np.testing.assert_array_equal(codec.encode(x), expected)
    np.testing.assert_array_equal(codec.encode(fortran), expected)
    np.testing.assert_array_equal(codec.encode(x[:, ::2]), codec.encode(x[:, ::2].copy()))
    assert codec.encode(np.float32(0.5)).tolist() == [8]
    assert codec.encode(np.zeros(0, dtype=dtype)).shape == (0,)


def test_encode_refuses_non_float_inputs_and_leaves_input_alone():
    codec = FixedPointCodec(clip=1.0, scale_bits=8)
    for bad in (np.arange(3), np.zeros(3, dtype=np.complex64), np.zeros(3, dtype=np.longdouble)):
        if bad.dtype == np.float64:  # platforms where longdouble is float64
            continue
        with pytest.raises(ParameterError):
            codec.encode(bad)
    x = np.linspace(-2, 2, 9, dtype=np.float32)
    before = x.copy()
    codec.encode(x, rounding_key=KEY)
    np.testing.assert_array_equal(x, before)


def test_non_finite_inputs_are_refused_with_count_and_first_index():
    codec = FixedPointCodec(clip=1.0, scale_bits=8)
    x = np.zeros(100_000, dtype=np.float32)
    x[70_001], x[99_999], x[80_000] = np.nan, np.inf, -np.inf
    with pytest.raises(NonFiniteInputError, match=r"3 non-finite.*index 70001"):
        codec.encode(x)
    with pytest.raises(NonFiniteInputError, match="index 0"):
        codec.encode(np.array([np.nan]))
    # huge but finite float32 values overflow when scaled; they are clipped, not refused
    big = np.array([3e38, -3e38], dtype=np.float32)
    assert codec.encode(big, rounding_key=KEY).tolist() == [256, 2**32 - 256]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_that_float32_cannot_hold_is_still_exact(dtype):
    codec = FixedPointCodec(clip=0.1, scale_bits=20, rounding="nearest")
    x = np.array([0.5, -0.5, np.float32(0.1), 0.0999], dtype=dtype)
    expected = [round(0.1 * 2**20), 2**32 - round(0.1 * 2**20)]
    expected += [round(float(v) * 2**20) % 2**32 for v in x[2:]]
    assert codec.encode(x).tolist() == expected


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-3.0, 3.0, width=32), min_size=1, max_size=40),
    st.sampled_from(RING_BITS),
    st.integers(0, 5),
)
def test_nearest_rounds_to_the_closest_quantum(values, ring_bits, scale_bits):
    codec = FixedPointCodec(clip=2.0, scale_bits=scale_bits, ring_bits=ring_bits,
                            rounding="nearest")
    x = np.array(values, dtype=np.float32)
    decoded = codec.decode_sum(codec.encode(x), n_summed=1)
    clipped = np.clip(x.astype(np.float64), -2.0, 2.0)
    assert np.all(np.abs(decoded - clipped) <= 2.0 ** -(scale_bits + 1))
    # the float32 and float64 paths agree exactly
    np.testing.assert_array_equal(codec.encode(x), codec.encode(x.astype(np.float64)))


def _expected_stochastic(x: np.ndarray, codec: FixedPointCodec, key: bytes,
                         at: np.ndarray | None = None) -> np.ndarray:
    """The documented rule, recomputed in exact arithmetic from the keystream words (at `at`)."""
    at = np.arange(x.size) if at is None else at
    words = prg.uniform_ring(key, x.size, ring_bits=32).astype(np.int64)[at]
    out = []
    for value, word in zip(x.reshape(-1)[at].tolist(), words.tolist(), strict=True):
        s = Fraction(min(max(value, -codec.clip), codec.clip)) * 2**codec.scale_bits
        floor = math.floor(s)
        u = Fraction(word >> 9, 2**23) if x.dtype == np.float32 else Fraction(word, 2**32)
        out.append((floor + (u < s - floor)) % codec.modulus)
    return np.array(out, dtype=np.uint64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ring_bits", RING_BITS)
def test_stochastic_rounding_follows_the_keystream(dtype, ring_bits):
    codec = FixedPointCodec(clip=3.0, scale_bits=4, ring_bits=ring_bits)
    key = bytes([ring_bits]) * 32
    x = np.linspace(-4.0, 4.0, 2001).astype(dtype)
    got = codec.encode(x, rounding_key=key)
    np.testing.assert_array_equal(got.astype(np.uint64), _expected_stochastic(x, codec, key))
    np.testing.assert_array_equal(codec.encode(x, rounding_key=key), got)
    assert not np.array_equal(codec.encode(x, rounding_key=bytes(32)), got)
    # without a key, fresh randomness: two encodings almost surely differ somewhere
    assert not np.array_equal(codec.encode(x), codec.encode(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stochastic_rounding_keeps_to_the_keystream_across_encode_blocks(dtype):
    # encode streams the rounding words block by block: word i must still round element i
    codec = FixedPointCodec(clip=3.0, scale_bits=4, ring_bits=32)
    block = codec_module._BLOCK
    x = np.random.default_rng(3).uniform(-4.0, 4.0, 2 * block + 77).astype(dtype)
    edges = np.array([0, block - 1, block, block + 1, 2 * block - 1, 2 * block, x.size - 1])
    at = np.concatenate([edges, np.random.default_rng(4).integers(0, x.size, 300)])
    got = codec.encode(x, rounding_key=KEY).astype(np.uint64)[at]
    np.testing.assert_array_equal(got, _expected_stochastic(x, codec, KEY, at))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scaled", [5.3125, -5.3125, 0.0078125, -0.4375, -(2.0**-30), 1000.75])
def test_stochastic_rounding_is_unbiased_on_a_repeated_value(dtype, scaled):
    # N Bernoulli(frac) draws: the mean's standard deviation is at most 0.5 / sqrt(N); a bound
    # of 6 sigma has a chance below 2e-9 of failing for a correct, unbiased rounding.
    n = 1 << 18
    codec = FixedPointCodec(clip=2048.0, scale_bits=4, ring_bits=32)
    x = np.full(n, scaled / 16, dtype=dtype)
    assert float(x[0]) * 16 == scaled  # dyadic, so exactly representable
    q = codec.encode(x, rounding_key=bytes([7]) * 32).view(np.int32).astype(np.float64)
    assert set(np.unique(q)) <= {math.floor(scaled), math.ceil(scaled)}
    assert abs(q.mean() - scaled) < 6 * 0.5 / math.sqrt(n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stochastic_rounding_is_unbiased_over_many_values_and_keys(dtype):
    # 64 keys x 8192 values in [-1, 1]; per draw |q - s| < 1 with mean 0 when unbiased, so the
    # grand mean has standard deviation <= 0.5 / sqrt(64 * 8192) ~ 6.9e-4 quanta.
    codec = FixedPointCodec(clip=1.0, scale_bits=10)
    x = (np.sin(np.arange(8192) * 0.7311) * 1.05).astype(dtype)
    s = np.clip(x.astype(np.float64), -1.0, 1.0) * 2**10
    errors = [
        codec.encode(x, rounding_key=bytes([k]) * 32).view(np.int32) - s for k in range(64)
    ]
    stacked = np.stack(errors)
    assert np.all(np.abs(stacked) < 1)
    assert abs(stacked.mean()) < 6 * 0.5 / math.sqrt(stacked.size)
    # per-element means follow the fractional parts (each mean of 64 draws, sd <= 1/16)
    assert np.abs(stacked.mean(axis=0)).max() < 0.5


# ---- decoding and the error bound --------------------------------------------------------------


@pytest.mark.parametrize("ring_bits", RING_BITS)
def test_decode_sum_reads_signed_values(ring_bits):
    codec = FixedPointCodec(clip=1.0, scale_bits=2, ring_bits=ring_bits)
    half = 1 << (ring_bits - 1)
    ring = np.array([0, 1, codec.mask, half - 1, half], dtype=codec.dtype)
    expected = np.array([0, 1, -1, half - 1, -half], dtype=np.float64) / 4
    np.testing.assert_array_equal(codec.decode_sum(ring, n_summed=1), expected)


def test_decode_sum_refuses_bad_inputs():
    codec = FixedPointCodec.for_clients(10, clip=1.0, ring_bits=16)
    codec.decode_sum(np.zeros(4, dtype=np.uint32), n_summed=codec.max_clients())
    with pytest.raises(OverflowBudgetError):
        codec.decode_sum(np.zeros(4, dtype=np.uint32), n_summed=codec.max_clients() + 1)
    with pytest.raises(ParameterError):
        codec.decode_sum(np.zeros(4, dtype=np.int64), n_summed=1)
    with pytest.raises(MalformedMessageError):
        codec.decode_sum(np.array([1 << 16], dtype=np.uint32), n_summed=1)


def test_error_bound_values():
    nearest = FixedPointCodec(clip=1.0, scale_bits=10, rounding="nearest")
    stochastic = FixedPointCodec(clip=1.0, scale_bits=10)
    assert nearest.error_bound(8) == 8 * 2.0**-11
    assert stochastic.error_bound(8) == 8 * 2.0**-10
    # a 64-bit ring whose sums outgrow float64's 53 bits adds the conversion error
    wide = FixedPointCodec.for_clients(4, clip=1.0, ring_bits=64)
    assert wide.error_bound(4) > 4 * 2.0**-wide.scale_bits
    assert wide.error_bound(4) < 4 * 2.0**-wide.scale_bits + 2.0**-50


clients = st.integers(1, 12)


@settings(max_examples=80, deadline=None)
@given(
    clients,
    st.sampled_from([0.5, 1.0, 3.0, 0.1]),
    st.sampled_from([16, 32, 64]),
    st.sampled_from(["nearest", "stochastic"]),
    st.sampled_from([np.float32, np.float64]),
    st.data(),
)
def test_decoded_sum_is_within_the_error_bound(n, clip, ring_bits, rounding, dtype, data):
    codec = FixedPointCodec.for_clients(n, clip=clip, ring_bits=ring_bits, rounding=rounding)
    values = st.floats(-4 * clip, 4 * clip)
    inputs = [
        np.array(data.draw(st.lists(values, min_size=6, max_size=6)), dtype=dtype)
        for _ in range(n)
    ]
    keys = [bytes([i]) * 32 for i in range(n)]
    total = codec.sum([codec.encode(x, rounding_key=k) for x, k in zip(inputs, keys, strict=True)])
    decoded = codec.decode_sum(total, n_summed=n)
    bound = Fraction(codec.error_bound(n))
    for j in range(6):
        exact = sum(Fraction(min(max(float(x[j]), -clip), clip)) for x in inputs)
        error = abs(Fraction(float(decoded[j])) - exact)
        assert error <= bound
        if rounding == "stochastic" and ring_bits <= 32:
            assert error < bound
