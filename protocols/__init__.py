"""The protocol layer: secure aggregation on numpy and cryptography only (never torch).

Front door: `secure_sum` for a one-call sum, `SecAggSession` for many steps over one key setup.
"""

from .api import PROTOCOLS, SecAggSession, SecureSumResult, secure_sum
from .errors import ProtocolError, TooFewSurvivorsError
from .network import Dropout, FaultPlan, Stage

__all__ = [
    "PROTOCOLS", "Dropout", "FaultPlan", "ProtocolError", "SecAggSession", "SecureSumResult",
    "Stage", "TooFewSurvivorsError", "secure_sum",
]
