"""The protocol layer: secure aggregation on numpy and cryptography only (never torch).

Front door: `secure_sum` for a one-call sum, `open_session` for many steps of any registered
aggregator (protocols.registry), `SecAggSession` for SecAgg's own options.
"""

from .api import SecAggSession, secure_sum
from .errors import ProtocolError, TooFewSurvivorsError
from .registry import open_session
from .session import Dropout, FaultPlan, SecureSumResult, Stage

__all__ = [
    "Dropout", "FaultPlan", "ProtocolError", "SecAggSession", "SecureSumResult", "Stage",
    "TooFewSurvivorsError", "open_session", "secure_sum",
]
