"""Row blocks of bn_act's partial sums, shared by its torch path and its Triton kernel (which
imports this module, not bn_act, so that the two import no cycle)."""

from __future__ import annotations

# The Triton kernel's tiles: 32 rows (positions) x up to 64 channels, 8 tiles per program on
# large maps. Its partial sums are per block of rows_per_block(M) positions, and so are the
# torch path's, so that both return the same shape.
BLOCK_M, TILES = 32, 8


def rows_per_block(m: int) -> int:
    """Positions (rows of the (M, C) view) in one partial sum: one program's rows."""
    return BLOCK_M * (TILES if m >= 64 * BLOCK_M * TILES else 1)  # small maps: more programs


def row_blocks(m: int) -> int:
    """How many partial sums an (M, C) view gets: one per block of rows_per_block(M) rows."""
    return -(-m // rows_per_block(m))
