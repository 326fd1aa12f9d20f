"""Every aggregator by name: a registry of specs (protocols.spec), and sessions opened from them.

`register(spec)` adds an aggregator, `get(name)` finds one (an unknown name is a ParameterError
listing the known ones), `open_session` is what an application calls; differential privacy wraps
any of them (`protocols.dp.private`).
"""

from __future__ import annotations

from collections.abc import Mapping

from .dp.mechanisms import DistributedNoise, DPSpec
from .dp.private import PrivateSession
from .errors import ParameterError
from .paillier.spec import PaillierSpec
from .plain import PlainSpec
from .secagg.client import Masker
from .secagg.server import Unmasker
from .secagg.spec import SecAggPlusSpec, SecAggSpec
from .session import AggregationSession, FaultPlan, RingNoise
from .spec import DEFAULT_KEY_BITS, AggregatorSpec, SessionOptions

__all__ = ["get", "names", "open_session", "register", "unregister"]

_SPECS: dict[str, AggregatorSpec] = {}


def register(spec: AggregatorSpec) -> AggregatorSpec:
    """Make `spec` available under `spec.name`; a name is registered once."""
    if spec.name in _SPECS:
        raise ParameterError(f"an aggregator named {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove the aggregator registered under `name`."""
    get(name)
    del _SPECS[name]


def get(name: str) -> AggregatorSpec:
    """The spec registered under `name`."""
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise ParameterError(f"unknown aggregator {name!r}; choose one of "
                             f"{', '.join(names())}") from None


def names() -> tuple[str, ...]:
    """The registered aggregators' names, in registration order."""
    return tuple(_SPECS)


for _spec in (PlainSpec(), SecAggSpec(), SecAggPlusSpec(), PaillierSpec()):
    register(_spec)


def open_session(protocol: str, n_clients: int, vector_length: int, *, clip: float,
                 ring_bits: int = 32, expected_dropout: float = 0.1,
                 rounding_seed: bytes | None = None, noise: RingNoise | None = None,
                 key_bits: int = DEFAULT_KEY_BITS, keypair: object | None = None,
                 threshold: int | None = None, degree: int | None = None,
                 dp: DPSpec | None = None, prg: str = "aes-256-ctr",
                 maskers: Mapping[int, Masker] | None = None,
                 unmasker: Unmasker | None = None, scale_bits: int | None = None,
                 faults: FaultPlan | None = None,
                 threat_model: str = "active") -> AggregationSession:
    """A fresh session of aggregator `protocol` for `n_clients` vectors of `vector_length` values.

    `maskers` (pairwise-mask aggregators only) builds chosen clients' uploads elsewhere, e.g. on a
    GPU, and `unmasker` the server's unmasked sum; the session's `prg` must be one they expand.
    `faults` (aggregators with an in-process network) drops, delays or alters chosen messages.
    `threat_model` ("active" or "semi-honest") is what a pairwise-mask server is trusted to do;
    other aggregators ignore it.

    With `dp`, every client's vector is clipped to L2 norm dp.l2_clip (which then is also the
    per-coordinate clip) and every release is noised (`protocols.dp.private`).
    """
    spec = get(protocol)
    options = SessionOptions(rounding_seed=rounding_seed, scale_bits=scale_bits,
                             key_bits=key_bits, keypair=keypair, prg=prg,
                             maskers=dict(maskers or {}), unmasker=unmasker, faults=faults,
                             threat_model=threat_model)
    plan = spec.plan(n_clients, threshold=threshold, degree=degree,
                     expected_dropout=expected_dropout, ring_bits=ring_bits,
                     private=dp is not None)
    if dp is not None:
        if dp.mode not in spec.dp_modes:
            raise ParameterError(f"aggregator {spec.name!r} offers DP modes "
                                 f"{', '.join(sorted(spec.dp_modes))}, not {dp.mode!r}")
        if dp.mode == "distributed":
            floor = plan.min_contributors
            if dp.min_contributors is None or dp.min_contributors > floor:
                raise ParameterError(
                    f"distributed noise sized for {dp.min_contributors} contributors, but a "
                    f"{spec.name} release of {n_clients} clients (threshold {plan.threshold}) "
                    f"can hold as few as {floor}: set min_contributors <= {floor}")
            noise = DistributedNoise(dp)
        else:
            noise = None
        clip = dp.l2_clip
    if (options.maskers or unmasker) and not spec.pairwise_masks:
        raise ParameterError(f"maskers and unmaskers handle pairwise-mask uploads; {protocol!r} "
                             "has none")
    if faults is not None and not spec.network_faults:
        raise ParameterError(f"{protocol!r} sessions run no in-process network to play faults on")
    session = spec.open(plan, vector_length, clip=clip, noise=noise, options=options)
    return session if dp is None else PrivateSession(session, dp)
