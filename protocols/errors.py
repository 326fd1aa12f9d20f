"""Exception hierarchy of the protocol layer; every failure a peer can cause is a ProtocolError."""

from __future__ import annotations


class ProtocolError(ValueError):
    """Root of every error the protocol layer raises on bad input, bad peers or bad parameters."""


class ParameterError(ProtocolError):
    """A protocol parameter (threshold, ring size, graph degree, ...) is invalid."""


class OverflowBudgetError(ParameterError):
    """The ring cannot hold the sum of all clients' clipped inputs: the sum could wrap."""


class NonFiniteInputError(ProtocolError):
    """An input vector holds NaN or infinity."""


class MalformedMessageError(ProtocolError):
    """Bytes from the network do not decode to a valid message (truncated, oversized, bad field)."""


class StageError(ProtocolError):
    """A message arrived in a stage where it is not allowed (out of order, wrong session)."""


class ReplayError(StageError):
    """A message repeats or rewinds a step that was already processed."""


class StateError(ProtocolError):
    """A client's saved state does not restore: truncated, oversized, another version, or
    inconsistent."""


class IntegrityError(ProtocolError):
    """Authenticated decryption failed or a peer's data is inconsistent."""


class PolicyViolationError(ProtocolError):
    """The server asked an honest client for something the protocol forbids revealing."""


class TooFewSurvivorsError(ProtocolError):
    """Fewer clients remain than the threshold needs."""

    def __init__(self, *, needed: int, remaining: int, context: str = "") -> None:
        self.needed = needed
        self.remaining = remaining
        where = f" ({context})" if context else ""
        super().__init__(
            f"too few surviving clients{where}: the threshold needs {needed}, "
            f"only {remaining} remain"
        )


class ConsistencyAbortError(ProtocolError):
    """Survivors fell silent in the consistency round: the step cannot finish and is abandoned.

    Nobody may release a silent survivor's self-mask shares without its tokens, and its
    neighbours have frozen their dropped sets, so its upload can be neither unmasked nor removed.
    The caller abandons the step and reruns its inputs at the next step without `silent`.
    """

    def __init__(self, *, step: int, silent: frozenset[int]) -> None:
        self.step = step
        self.silent = frozenset(silent)
        super().__init__(
            f"step {step} abandoned: clients {sorted(self.silent)} did not answer the "
            "consistency round"
        )
