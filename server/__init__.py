"""The coordinator: round loop, reply verification, aggregation (the ServerApp lives in `.app`).

`ReplyVerifier` checks every site reply's signed claim against the federation manifest, for every
scheme; aggregators check and sum only payloads whose claims verified.
"""

from .aggregation import Aggregator, CkksAggregator, PlainAggregator, Rejection, SiteUpdate
from .loop import LoopResult, RoundLoop
from .verifier import ReplyRejected, ReplyVerifier, VerifiedClaim

__all__ = [
    "Aggregator",
    "CkksAggregator",
    "LoopResult",
    "PlainAggregator",
    "Rejection",
    "ReplyRejected",
    "ReplyVerifier",
    "RoundLoop",
    "SiteUpdate",
    "VerifiedClaim",
]
