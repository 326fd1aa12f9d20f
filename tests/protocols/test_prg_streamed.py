"""Streamed keystreams: word blocks and added masks against whole uniform_ring vectors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import ParameterError
from protocols.primitives import prg

KEYS = [bytes([i]) * 32 for i in range(1, 6)]
RING_BITS = st.sampled_from([8, 13, 16, 31, 32, 33, 48, 63, 64])
ALGORITHMS = st.sampled_from(prg.ALGORITHMS)
# Lengths around the 64 Ki-word block and across ChaCha20's 64-byte blocks.
LENGTHS = st.sampled_from([0, 1, 15, 17, 1000, prg.STREAM_BLOCK_WORDS - 1,
                           prg.STREAM_BLOCK_WORDS, prg.STREAM_BLOCK_WORDS + 3,
                           2 * prg.STREAM_BLOCK_WORDS + 5])


def one_mask_at_a_time(total, signed_keys, ring_bits, nonce, algorithm):
    """The reference: each whole uniform_ring vector added or subtracted in turn, then reduced."""
    out = total.copy()
    for key, sign in signed_keys:
        mask = prg.uniform_ring(key, total.size, ring_bits=ring_bits, nonce=nonce,
                                algorithm=algorithm)
        (np.add if sign > 0 else np.subtract)(out, mask, out=out)
    if ring_bits not in (32, 64):
        np.bitwise_and(out, out.dtype.type((1 << ring_bits) - 1), out=out)
    return out


def ring_vector(length: int, ring_bits: int, seed: int) -> np.ndarray:
    dtype = np.uint32 if ring_bits <= 32 else np.uint64
    return np.random.default_rng(seed).integers(0, 2**ring_bits, length, dtype=dtype)


@settings(max_examples=40, deadline=None)
@given(ring_bits=RING_BITS, length=LENGTHS, algorithm=ALGORITHMS,
       signs=st.lists(st.sampled_from([1, -1]), min_size=0, max_size=5),
       counter=st.sampled_from([0, 7]))
def test_added_masks_equal_whole_masks_added_in_turn(ring_bits, length, algorithm, signs,
                                                      counter):
    nonce = counter.to_bytes(4, "little") + bytes(12)
    signed = list(zip(KEYS, signs, strict=False))
    total = ring_vector(length, ring_bits, seed=length + ring_bits)
    expected = one_mask_at_a_time(total, signed, ring_bits, nonce, algorithm)
    prg.add_uniform_rings(total, signed, ring_bits=ring_bits, nonce=nonce, algorithm=algorithm)
    assert total.dtype == expected.dtype
    np.testing.assert_array_equal(total, expected)


@settings(max_examples=30, deadline=None)
@given(ring_bits=RING_BITS, length=LENGTHS, algorithm=ALGORITHMS,
       block=st.sampled_from([1, 16, 1000, prg.STREAM_BLOCK_WORDS]))
def test_word_blocks_concatenate_to_uniform_ring(ring_bits, length, algorithm, block):
    blocks = [words.copy() for words in prg.uniform_word_blocks(
        KEYS[0], length, ring_bits=ring_bits, block=block, algorithm=algorithm)]
    assert all(b.size == block for b in blocks[:-1])
    joined = np.concatenate(blocks) if blocks else np.empty(0, np.uint32)
    whole = prg.uniform_ring(KEYS[0], length, ring_bits=ring_bits, algorithm=algorithm)
    np.testing.assert_array_equal(joined, whole)


def test_adding_then_subtracting_a_mask_restores_the_vector():
    total = ring_vector(5000, 32, seed=1)
    original = total.copy()
    prg.add_uniform_rings(total, [(KEYS[0], 1)], ring_bits=32)
    assert not np.array_equal(total, original)
    prg.add_uniform_rings(total, [(KEYS[0], -1)], ring_bits=32)
    np.testing.assert_array_equal(total, original)


def test_an_unreduced_total_comes_back_reduced():
    total = np.full(100, 2**32 - 1, dtype=np.uint32)
    prg.add_uniform_rings(total, [], ring_bits=12)
    assert int(total.max()) == 2**12 - 1


@pytest.mark.parametrize("total, ring_bits", [
    (np.zeros(8, np.uint64), 32),       # wrong width for the ring
    (np.zeros(8, np.uint32), 33),
    (np.zeros(8, np.int32), 32),        # signed
    (np.zeros((2, 4), np.uint32), 32),  # not 1-D
    (np.zeros(16, np.uint32)[::2], 32),  # not contiguous
    ([0, 0, 0], 32),                    # not an array
])
def test_refuses_a_total_it_cannot_update_in_place(total, ring_bits):
    with pytest.raises(ParameterError, match="total"):
        prg.add_uniform_rings(total, [(KEYS[0], 1)], ring_bits=ring_bits)


def test_refuses_a_read_only_total():
    total = np.zeros(8, np.uint32)
    total.flags.writeable = False
    with pytest.raises(ParameterError, match="writeable"):
        prg.add_uniform_rings(total, [(KEYS[0], 1)], ring_bits=32)


@pytest.mark.parametrize("sign", [0, 2, True, 1.0, "+"])
def test_refuses_a_sign_other_than_plus_or_minus_one(sign):
    total = np.zeros(8, np.uint32)
    with pytest.raises(ParameterError, match="sign"):
        prg.add_uniform_rings(total, [(KEYS[0], sign)], ring_bits=32)
    assert not total.any()  # refused before any mask was added


def test_refuses_bad_keys_and_a_chacha20_counter_overflow():
    total = np.zeros(64, np.uint32)
    with pytest.raises(ParameterError, match="key"):
        prg.add_uniform_rings(total, [(b"short", 1)], ring_bits=32)
    near_end = (2**32 - 1).to_bytes(4, "little") + bytes(12)
    with pytest.raises(ParameterError, match="overflow"):
        prg.add_uniform_rings(total, [(KEYS[0], 1)], ring_bits=32, nonce=near_end,
                              algorithm="chacha20")
    with pytest.raises(ParameterError, match="block"):
        prg.uniform_word_blocks(KEYS[0], 10, ring_bits=32, block=0)


def test_word_blocks_refuse_bad_arguments_when_called_not_when_first_read():
    with pytest.raises(ParameterError, match="key"):
        prg.uniform_word_blocks(b"short", 0, ring_bits=32)
    with pytest.raises(ParameterError, match="ring_bits"):
        prg.uniform_word_blocks(KEYS[0], 10, ring_bits=7)
