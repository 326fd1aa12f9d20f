"""Slot packing: exact round trips, carry-free sums at the extremes, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import (
    IntegrityError,
    MalformedMessageError,
    OverflowBudgetError,
    ParameterError,
    ProtocolError,
)
from protocols.paillier.packing import SlotLayout, pack, unpack_sum


@st.composite
def layouts(draw) -> SlotLayout:
    """Layouts from 1-bit values to n V = 2^63 - 1, the largest the int64 readout allows."""
    n = draw(st.integers(1, 300))
    top = (2**63 - 1) // n
    bound = draw(st.one_of(st.integers(1, min(2**20, top)), st.integers(top // 2, top)))
    return SlotLayout(value_bound=bound, max_summands=n,
                      plaintext_bits=draw(st.sampled_from([255, 511, 2047, 3071])),
                      guard_bits=draw(st.integers(0, 3)))


def _vectors(layout: SlotLayout, draw, count: int, length: int) -> list[np.ndarray]:
    """Uniform values in [-V, V] with the extremes -V, V, 0 planted at random places."""
    v = layout.value_bound
    rng = np.random.default_rng(draw(st.integers(0, 2**32)))
    rows = rng.integers(-v, v, size=(count, length), endpoint=True, dtype=np.int64)
    which = rng.integers(0, 4, size=rows.shape)  # 3: keep the uniform value
    extremes = np.array([-v, v, 0], np.int64)
    rows[which < 3] = extremes[which[which < 3]]
    if draw(st.booleans()):  # the worst case: one extreme everywhere
        rows[:] = extremes[draw(st.integers(0, 1))]
    return list(rows)


def test_slot_width_is_value_bits_plus_log_n_plus_guard():
    lay = SlotLayout(value_bound=1000, max_summands=10, plaintext_bits=2047, guard_bits=2)
    assert lay.value_bits == (2000).bit_length() == 11
    assert lay.slot_bits == 11 + math.ceil(math.log2(10)) + 2 == 17
    assert lay.slots == 2047 // 17
    assert lay.plaintexts_for(lay.slots) == 1
    assert lay.plaintexts_for(lay.slots + 1) == 2


@settings(max_examples=60, deadline=None)
@given(layout=layouts(), data=st.data())
def test_pack_unpack_round_trip(layout, data):
    length = data.draw(st.integers(1, 3 * layout.slots + 1))
    (values,) = _vectors(layout, data.draw, 1, length)
    plaintexts = pack(layout, values)
    assert len(plaintexts) == layout.plaintexts_for(length)
    assert all(0 <= p < 1 << layout.plaintext_bits for p in plaintexts)
    np.testing.assert_array_equal(unpack_sum(layout, plaintexts, length=length, n_summed=1),
                                  values)


@settings(max_examples=60, deadline=None)
@given(layout=layouts(), data=st.data())
def test_sum_of_packings_is_packing_of_sum(layout, data):
    k = data.draw(st.integers(1, min(layout.max_summands, 40)))
    length = data.draw(st.integers(1, 2 * layout.slots + 1))
    vectors = _vectors(layout, data.draw, k, length)
    packed = [pack(layout, v) for v in vectors]
    total = [sum(column) for column in zip(*packed, strict=True)]
    assert all(t < 1 << layout.plaintext_bits for t in total)  # stays below N: no wrap
    expected = np.sum([v.astype(object) for v in vectors], axis=0)
    got = unpack_sum(layout, total, length=length, n_summed=k)
    assert [int(x) for x in got] == [int(x) for x in expected]


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("bound", [1, 255, 2**31, 2**62 // 300])
def test_n_extreme_values_never_carry(sign, bound):
    """All n uploads at +V (or -V) in every slot: the largest (smallest) slot sums."""
    n = 300
    layout = SlotLayout(value_bound=bound, max_summands=n, plaintext_bits=3071, guard_bits=0)
    length = 2 * layout.slots
    values = np.full(length, sign * bound, np.int64)
    total = sum(pack(layout, values)[0] for _ in range(n))
    # every slot sum fits its own slot exactly (no carry into its neighbour) ...
    width = layout.slot_bits
    slots = [(total >> (i * width)) & ((1 << width) - 1) for i in range(layout.slots)]
    assert slots == [n * (bound + sign * bound)] * layout.slots
    # ... and unpacks to the exact signed sum
    second = sum(pack(layout, values)[1] for _ in range(n))
    got = unpack_sum(layout, [total, second], length=length, n_summed=n)
    assert set(got.tolist()) == {sign * n * bound}


def test_values_outside_the_bound_are_refused():
    layout = SlotLayout(value_bound=100, max_summands=4, plaintext_bits=255)
    with pytest.raises(OverflowBudgetError):
        pack(layout, np.array([0, 101], np.int64))
    with pytest.raises(OverflowBudgetError):
        pack(layout, np.array([-101], np.int64))
    with pytest.raises(ParameterError):
        pack(layout, np.array([1.0]))


def test_layouts_that_cannot_hold_the_sum_are_refused():
    with pytest.raises(OverflowBudgetError):  # a slot wider than the plaintext
        SlotLayout(value_bound=2**60, max_summands=4, plaintext_bits=63)
    with pytest.raises(OverflowBudgetError):  # n V beyond int64
        SlotLayout(value_bound=2**62, max_summands=4, plaintext_bits=2047)
    with pytest.raises(ParameterError):
        SlotLayout(value_bound=0, max_summands=4, plaintext_bits=2047)


def test_unpack_detects_broken_bounds():
    layout = SlotLayout(value_bound=100, max_summands=4, plaintext_bits=255)
    w, s = layout.slot_bits, layout.slots
    good = pack(layout, np.zeros(s - 1, np.int64))[0]
    assert unpack_sum(layout, [good], length=s - 1, n_summed=1).tolist() == [0] * (s - 1)
    with pytest.raises(IntegrityError):  # a slot above 2 k V
        unpack_sum(layout, [good + 201], length=s - 1, n_summed=1)
    with pytest.raises(IntegrityError):  # the padding slot is not zero
        unpack_sum(layout, [good + (1 << ((s - 1) * w))], length=s - 1, n_summed=1)
    with pytest.raises(IntegrityError):  # bits beyond the last slot
        unpack_sum(layout, [good + (1 << (s * w))], length=s - 1, n_summed=1)
    with pytest.raises(MalformedMessageError):  # wrong number of plaintexts
        unpack_sum(layout, [good, good], length=s - 1, n_summed=1)
    with pytest.raises(ProtocolError):
        unpack_sum(layout, [good], length=s - 1, n_summed=5)
