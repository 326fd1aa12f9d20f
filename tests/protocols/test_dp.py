"""DP mechanisms: spec validation, clipping, noise scale and shape, ring budget, reproducibility.

Statistical tolerances: for N i.i.d. draws the sample mean has standard error sigma/sqrt(N) and
the sample variance a relative standard error sqrt((2 + kappa)/N) (kappa = excess kurtosis, at
most 1/variance for these integer laws). Every check allows 6 standard errors, so a correct
sampler fails one check with probability ~2e-9; a sampler off by 3% in variance fails at N=2e5.
Keys are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from protocols.codec import FixedPointCodec
from protocols.dp import mechanisms as dp
from protocols.errors import ParameterError, TooFewSurvivorsError

N = 200_000


def key(*parts: object) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


def assert_moments(x: np.ndarray, variance: float, kurtosis: float = 0.0) -> None:
    n = x.size
    mean_se = math.sqrt(variance / n)
    assert abs(x.mean()) <= 6 * mean_se, (x.mean(), mean_se)
    rel_se = math.sqrt((2.0 + kurtosis) / n)
    assert abs(x.var() / variance - 1.0) <= 6 * rel_se, (x.var() / variance, rel_se)


def spec(**kw):
    base = dict(mode="distributed", noise_multiplier=1.0, l2_clip=1.0, min_contributors=3)
    return dp.DPSpec(**{**base, **kw})


# ---- spec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "kw"), [
    ("mode", dict(mode="local")),
    ("noise_multiplier", dict(noise_multiplier=0.0)),
    ("noise_multiplier", dict(noise_multiplier=-1.0)),
    ("noise_multiplier", dict(noise_multiplier=math.nan)),
    ("noise_multiplier", dict(noise_multiplier=True)),
    ("l2_clip", dict(l2_clip=0.0)),
    ("l2_clip", dict(l2_clip=math.inf)),
    ("noise", dict(noise="gaussian")),  # continuous noise cannot enter the ring
    ("noise", dict(noise="laplace")),
    ("min_contributors", dict(min_contributors=None)),
    ("min_contributors", dict(min_contributors=0)),
    ("min_contributors", dict(min_contributors=2.0)),
])
def test_bad_specs_are_refused_naming_the_field(field, kw):
    with pytest.raises(ParameterError, match=field):
        spec(**kw)


def test_spec_defaults_and_central_refuses_integer_noise():
    assert spec().noise == "skellam"
    central = dp.DPSpec(mode="central", noise_multiplier=2.0, l2_clip=0.5)
    assert central.noise == "gaussian" and central.central_sigma == 1.0
    with pytest.raises(ParameterError, match="noise"):
        dp.DPSpec(mode="central", noise_multiplier=1.0, l2_clip=1.0, noise="skellam")
    with pytest.raises(TypeError):
        dp.DPSpec("central", 1.0, 1.0)  # keyword-only: no positional security parameters


# ---- clipping -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    v=arrays(st.sampled_from([np.float32, np.float64]), st.integers(1, 300),
             elements=st.floats(-1e6, 1e6, width=32)),
    c=st.floats(1e-3, 1e3),
)
def test_clip_l2_bounds_the_norm_and_keeps_direction(v, c):
    out, clipped = dp.clip_l2(v, c)
    norm = np.linalg.norm(v.astype(np.float64))
    assert out.dtype == v.dtype and out.shape == (v.size,)
    assert np.linalg.norm(out.astype(np.float64)) <= c
    assert clipped == (norm > c)
    if not clipped:
        np.testing.assert_array_equal(out, v.reshape(-1))
    else:  # a positive multiple of v, up to float32 rounding of the product
        factor = c / norm
        np.testing.assert_allclose(out, v.astype(np.float64) * factor, rtol=2e-6,
                                   atol=1e-6 * c)


def test_clip_l2_refuses_bad_input():
    with pytest.raises(ParameterError, match="max_norm"):
        dp.clip_l2(np.ones(3), 0.0)
    with pytest.raises(ParameterError, match="NaN"):
        dp.clip_l2(np.array([1.0, np.nan]), 1.0)
    with pytest.raises(ParameterError, match="float"):
        dp.clip_l2(np.ones(3, dtype=np.int64), 1.0)


# ---- samplers -----------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.8, 3.5, 250.0, 2.0**20, 2.0**39])
def test_discrete_gaussian_scale(sigma):
    x = dp.discrete_gaussian(sigma, N, key=key("dg", sigma))
    assert x.dtype == np.int64
    # Var N_Z(0, s^2) < s^2, by less than 1e-8 relative once s >= 0.8 (Poisson summation).
    assert_moments(x, sigma**2, kurtosis=1.0 / sigma**2)


@pytest.mark.parametrize("variance", [3.0, 30.0, 4000.0, 2.0**40, 2.0**78])
def test_skellam_scale(variance):
    # 3.0 takes the inversion table (lambda < 10), the others PTRS, 2^78 its offset form.
    x = dp.skellam(variance, N, key=key("sk", variance))
    assert x.dtype == np.int64
    assert_moments(x, variance, kurtosis=1.0 / variance)


def _frequencies_match(x: np.ndarray, pmf: dict[int, float]) -> None:
    for k, p in pmf.items():
        observed = np.count_nonzero(x == k) / x.size
        assert abs(observed - p) <= 6 * math.sqrt(p * (1 - p) / x.size), (k, observed, p)


def test_discrete_gaussian_pmf():
    sigma = 1.5
    weights = {k: math.exp(-k * k / (2 * sigma**2)) for k in range(-40, 41)}
    norm = sum(weights.values())
    x = dp.discrete_gaussian(sigma, N, key=key("dg-pmf"))
    _frequencies_match(x, {k: w / norm for k, w in weights.items() if abs(k) <= 6})


@pytest.mark.parametrize("lam", [2.0, 15.0])  # inversion and PTRS
def test_skellam_pmf(lam):
    poisson = [math.exp(k * math.log(lam) - lam - math.lgamma(k + 1)) for k in range(200)]
    pmf = {d: sum(poisson[k + abs(d)] * poisson[k] for k in range(200 - abs(d)))
           for d in range(-int(4 * math.sqrt(2 * lam)), int(4 * math.sqrt(2 * lam)) + 1)}
    _frequencies_match(dp.skellam(2 * lam, N, key=key("sk-pmf", lam)), pmf)


def test_gaussian_and_central_noise_scale():
    assert_moments(dp.gaussian(3.0, N, key=key("g")), 9.0)
    central = dp.DPSpec(mode="central", noise_multiplier=2.0, l2_clip=0.75)
    base = np.full((400, 500), 7.0)
    noisy = dp.add_central_noise(base, central, key=key("central"))
    assert noisy.shape == base.shape and noisy.dtype == np.float64
    assert_moments((noisy - base).reshape(-1), 1.5**2)
    with pytest.raises(ParameterError):
        dp.add_central_noise(base, spec())


def test_bound_conditions_the_draws():
    x = dp.discrete_gaussian(10.0, N, key=key("bound"), bound=5)
    assert np.abs(x).max() == 5
    _frequencies_match(x, {k: math.exp(-k * k / 200) / sum(
        math.exp(-j * j / 200) for j in range(-5, 6)) for k in range(-5, 6)})
    assert np.abs(dp.skellam(100.0, N, key=key("bound-sk"), bound=3)).max() == 3


def test_reproducible_with_a_key_and_fresh_without():
    k = key("repro")
    for sampler in (dp.discrete_gaussian, dp.skellam, dp.gaussian):
        np.testing.assert_array_equal(sampler(50.0, 1000, key=k), sampler(50.0, 1000, key=k))
        assert not np.array_equal(sampler(50.0, 1000), sampler(50.0, 1000))
    # One DistributedNoise object never repeats a draw: calls continue its keystream.
    noise = dp.DistributedNoise(spec(), key=k)
    first, second = noise.sample(1000, 16), noise.sample(1000, 16)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(dp.DistributedNoise(spec(), key=k).sample(1000, 16), first)


def test_sampler_arguments_are_checked():
    with pytest.raises(ParameterError):
        dp.discrete_gaussian(0.0, 10)
    with pytest.raises(ParameterError):
        dp.discrete_gaussian(2.0**41, 10)
    with pytest.raises(ParameterError):
        dp.skellam(-1.0, 10)
    with pytest.raises(ParameterError):
        dp.skellam(4.0, -1)
    with pytest.raises(ParameterError, match="key"):
        dp.gaussian(1.0, 10, key=b"short")


# ---- distributed noise and the ring -------------------------------------------------------


@pytest.mark.parametrize("kind", ["discrete_gaussian", "skellam"])
@pytest.mark.parametrize(("n", "t"), [(3, 3), (5, 3)])
def test_distributed_noise_sums_to_the_central_variance(kind, n, t):
    s = spec(noise=kind, min_contributors=t, noise_multiplier=1.3, l2_clip=0.5)
    scale_bits = 10
    total = sum(dp.DistributedNoise(s, key=key("dist", kind, n, t, c)).sample(N, scale_bits)
                for c in range(n))
    central_units = math.ldexp(s.central_sigma, scale_bits) ** 2
    # exactly the central variance when t survive; n/t times it (conservative) when n > t
    assert_moments(total, central_units * n / t)


@pytest.mark.parametrize("kind", ["discrete_gaussian", "skellam"])
def test_noise_stays_inside_the_codec_budget(kind):
    n, clip, s = 4, 1.0, spec(noise=kind, min_contributors=3, noise_multiplier=2.0)
    noise = dp.DistributedNoise(s, key=key("budget", kind))
    codec = FixedPointCodec.for_clients(n, clip=clip, headroom=noise.headroom,
                                        rounding="nearest")
    bound = noise.bound_units(codec.scale_bits)
    assert bound <= codec.noise_units(noise.headroom)
    assert noise.tail_probability(codec.scale_bits) <= 2.0**-noise.tail_bits
    # the worst case: every client at +clip with the largest noise still decodes unwrapped
    limit = (1 << (codec.ring_bits - 1)) - 1
    assert n * (math.ceil(clip * 2**codec.scale_bits) + bound) <= limit
    # a real ring sum of noised encodings decodes to the clipped sum plus the summed noise
    x = np.full(5000, clip, dtype=np.float32)
    draws = [noise.sample(x.size, codec.scale_bits) for _ in range(n)]
    assert max(int(np.abs(d).max()) for d in draws) <= bound
    ring = codec.sum(codec.add(codec.encode(x), d.astype(codec.dtype)) for d in draws)
    decoded = codec.decode_sum(ring, n_summed=n)
    expected = n * clip + np.sum(draws, axis=0) * 2.0**-codec.scale_bits
    np.testing.assert_allclose(decoded, expected, rtol=0, atol=1e-12)


def test_headroom_tail_and_sigma_range():
    for kind in ("discrete_gaussian", "skellam"):
        noise = dp.DistributedNoise(spec(noise=kind), tail_bits=100)
        for f in (5, 12, 30):
            assert 0 < noise.tail_probability(f) <= 2.0**-100
        assert noise.sigma_units(12) == pytest.approx(2**12 / math.sqrt(3))
    noise = dp.DistributedNoise(spec())
    with pytest.raises(ParameterError, match="scale_bits"):
        noise.sample(10, 0)  # sigma below MIN_SIGMA_UNITS
    with pytest.raises(ParameterError, match="scale_bits"):
        noise.sample(10, 60)  # sigma above 2^40
    with pytest.raises(ParameterError, match="tail_bits"):
        dp.DistributedNoise(spec(), tail_bits=8)
    with pytest.raises(ParameterError, match="distributed"):
        dp.DistributedNoise(dp.DPSpec(mode="central", noise_multiplier=1.0, l2_clip=1.0))


def test_contributor_threshold():
    dp.check_contributors(spec(min_contributors=3), 3)
    with pytest.raises(TooFewSurvivorsError):
        dp.check_contributors(spec(min_contributors=3), 2)
    dp.check_contributors(dp.DPSpec(mode="central", noise_multiplier=1.0, l2_clip=1.0), 1)


def test_accounting_noise_multiplier():
    central = dp.DPSpec(mode="central", noise_multiplier=2.0, l2_clip=1.0)
    assert dp.accounting_noise_multiplier(central, dim=4096, scale_bits=None) == 2.0
    # rounding: sensitivity C + sqrt(d) 2^-f = 1 + 64/2^16
    assert dp.accounting_noise_multiplier(central, dim=4096, scale_bits=16) == pytest.approx(
        2.0 / (1 + 2.0**-10))
    for kind in ("discrete_gaussian", "skellam"):
        s = spec(noise=kind, noise_multiplier=2.0)
        z = [dp.accounting_noise_multiplier(s, dim=4096, scale_bits=f) for f in (8, 16, 24)]
        assert z[0] < z[1] < z[2] < 2.0 and z[2] == pytest.approx(2.0, rel=1e-3)
        with pytest.raises(ParameterError):
            dp.accounting_noise_multiplier(s, dim=4096, scale_bits=None)
    # Skellam pays its extra 3 D1 term: slightly below the discrete Gaussian at equal variance
    dg = dp.accounting_noise_multiplier(spec(noise="discrete_gaussian"), dim=64, scale_bits=16)
    sk = dp.accounting_noise_multiplier(spec(noise="skellam"), dim=64, scale_bits=16)
    assert sk < dg
