"""[privacy]: differential privacy, its unit, noise and accounting."""

from __future__ import annotations

from dataclasses import dataclass

from codream_secure.config.checks import Checks
from codream_secure.config.section import Section

DP_UNITS: tuple[str, ...] = ("off", "client", "sample")
DP_MODES: tuple[str, ...] = ("central", "distributed")
DP_NOISE_KINDS: tuple[str, ...] = ("skellam", "discrete_gaussian")
DP_ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv", "gdp")


@dataclass(frozen=True)
class PrivacyConfig(Section):
    """Client- or sample-level DP: a noise multiplier or a target epsilon, clips, accountant."""

    SECTION = "privacy"

    dp: str = "off"
    dp_epsilon: float | None = None
    dp_noise: float | None = None
    dp_delta: float = 1e-5
    dp_clip: float = 1.0
    dp_label_clip: float | None = None
    dp_mode: str = "distributed"
    dp_noise_kind: str = "skellam"
    dp_accountant: str = "rdp"

    def validate(self, check: Checks) -> None:
        check.choice("dp", self.dp, DP_UNITS)
        check.choice("dp_mode", self.dp_mode, DP_MODES)
        check.choice("dp_noise_kind", self.dp_noise_kind, DP_NOISE_KINDS)
        check.choice("dp_accountant", self.dp_accountant, DP_ACCOUNTANTS)
        for key in ("dp_noise", "dp_epsilon", "dp_label_clip"):
            if getattr(self, key) is not None:
                check.real(key, getattr(self, key), low=0.0)
        check.real("dp_clip", self.dp_clip, low=0.0)
        check.real("dp_delta", self.dp_delta, low=0.0, high=1.0)
        if self.dp == "off":
            if self.dp_noise is not None or self.dp_epsilon is not None:
                raise check.fail("dp", "dp_noise/dp_epsilon given but dp is 'off'; add --dp "
                                       "client (or sample)")
            return
        if (self.dp_noise is None) == (self.dp_epsilon is None):
            raise check.fail("dp", f"{self.dp}-level DP needs exactly one of dp_noise (the noise "
                                   "multiplier z) or dp_epsilon (a target, z calibrated from it)")
        if self.dp == "client" and self.dp_mode == "distributed" and self.dp_accountant != "rdp":
            raise check.fail("dp_accountant", f"distributed noise ({self.dp_noise_kind}) is "
                             "integer noise, accounted with RDP only (PRV and GDP assume a "
                             "continuous Gaussian); set dp_accountant = \"rdp\", or dp_mode = "
                             "\"central\" for PRV or GDP")
