"""[run]: the seed, the baselines run beside CoDream, and the output folder."""

from __future__ import annotations

from dataclasses import dataclass

from codream_secure.config.checks import Checks
from codream_secure.config.section import Section

BASELINES: tuple[str, ...] = ("isolated", "fedavg", "centralized")
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class RunConfig(Section):
    """What a run derives its randomness from, what it compares against, where it writes."""

    SECTION = "run"
    TUPLES = ("baselines",)
    PATHS = ("out",)

    seed: int = 0
    baselines: tuple[str, ...] = ("isolated", "fedavg", "centralized")
    out: str = "runs/latest"

    def validate(self, check: Checks) -> None:
        # torch takes seeds below 2^63, and baselines seed client k's generator seed * 1000 + k
        check.count("seed", self.seed, minimum=0, maximum=MAX_SEED)
        for name in self.baselines:
            check.choice("baselines", name, BASELINES)
        check.unique("baselines", self.baselines)
        check.path("out", self.out)
