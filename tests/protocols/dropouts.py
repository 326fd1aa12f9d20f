"""What the generated dropout tests share: calls, drawn dropouts, and the reference they check.

The reference (who falls silent when, the exact sum of clipped inputs) is worked out here from
the drawn plan, never by the code under test.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from protocols.session import SETUP_STAGES, Dropout, Stage

STEP_STAGES = [s for s in Stage if s not in SETUP_STAGES]
ORDER = {stage: index for index, stage in enumerate(Stage)}
DTYPES = ["float16", "float32", "float64"]


@dataclass(frozen=True)
class Call:
    """One `step` call: clients left out of `inputs`, and clients that leave after uploading."""

    absent: frozenset[int]
    leaving: frozenset[int]

    def __repr__(self) -> str:
        return f"Call(absent={sorted(self.absent)}, leaving={sorted(self.leaving)})"


def _dropout(draw, client: int, last_step: int) -> Dropout:
    step = draw(st.integers(0, last_step))
    stages = list(SETUP_STAGES) if step == 0 else STEP_STAGES
    return Dropout(client, step, draw(st.sampled_from(stages)))


def draw_dropouts(draw, n: int, rate: float, last_step: int) -> list[Dropout]:
    """Each client drops with probability `rate` at a drawn stage of a step <= last_step, and
    now and then is named twice (the earliest must win)."""
    dropouts = []
    for client in range(n):
        if draw(st.floats(0, 1)) < rate:
            dropouts.append(_dropout(draw, client, last_step))
            if draw(st.integers(0, 4)) == 0:
                dropouts.append(_dropout(draw, client, last_step))
    return dropouts


def draw_calls(draw, n: int, max_calls: int) -> tuple[Call, ...]:
    """Up to max_calls calls (at least one when max_calls > 0), each leaving out or letting go
    of up to two clients."""
    calls = []
    for _ in range(draw(st.integers(min(1, max_calls), max_calls))):
        absent = draw(st.sets(st.integers(0, n - 1), max_size=2))
        leaving = draw(st.sets(st.integers(0, n - 1), max_size=2)) - absent
        calls.append(Call(frozenset(absent), frozenset(leaving)))
    return tuple(calls)


def describe(dropouts: Iterable[Dropout]) -> str:
    return ", ".join(f"{d.client}@{d.step}:{d.stage.value}" for d in dropouts)


def silent_points(dropouts: Iterable[Dropout]) -> dict[int, tuple[int, int]]:
    """client -> (step, stage index) of its earliest dropout."""
    points: dict[int, tuple[int, int]] = {}
    for d in dropouts:
        point = (d.step, ORDER[d.stage])
        points[d.client] = min(points.get(d.client, point), point)
    return points


def seeded_inputs(seed: int, call: int, shape: tuple[int, int], clip: float,
                  dtype: str) -> np.ndarray:
    """Inputs of one call, drawn within twice the clip: clipping is part of what is checked."""
    rng = np.random.default_rng([seed, call])
    return rng.uniform(-2 * clip, 2 * clip, shape).astype(dtype)


def clipped_sum(values: np.ndarray, clients: Iterable[int], clip: float) -> np.ndarray:
    """The exact sum of the clients' clipped inputs, in float64."""
    rows = values[sorted(clients)].astype(np.float64)
    return np.clip(rows, -clip, clip).sum(axis=0)
