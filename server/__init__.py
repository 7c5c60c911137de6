"""The coordinator: round loop, reply verification, aggregation (the ServerApp lives in `.app`).

`ReplyVerifier` checks every site reply's signed claim against the federation manifest, for every
scheme; aggregators check and sum only payloads whose claims verified. `RoundLoop` writes a
`RoundCheckpoint` after every round and continues from one (`resume_from=`).
"""

from .aggregation import Aggregator, CkksAggregator, PlainAggregator, Rejection, SiteUpdate
from .checkpoint import CheckpointError, RoundCheckpoint, load_checkpoint, load_latest_checkpoint, save_checkpoint
from .loop import LoopResult, RoundLoop
from .verifier import ReplyRejected, ReplyVerifier, VerifiedClaim

__all__ = [
    "Aggregator",
    "CheckpointError",
    "CkksAggregator",
    "LoopResult",
    "PlainAggregator",
    "Rejection",
    "ReplyRejected",
    "ReplyVerifier",
    "RoundCheckpoint",
    "RoundLoop",
    "SiteUpdate",
    "VerifiedClaim",
    "load_checkpoint",
    "load_latest_checkpoint",
    "save_checkpoint",
]
