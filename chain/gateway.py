"""The typed facade the server, client and auditor use: `AuthChain`, `DataChain`, `ChainSession`.

    session = open_session(config.chain, state_dir=...)
    session.auth.register_site(site_id="hosp0", address=..., key_fingerprint=...)   # admin
    session.auth.approve_run(site=session.site_account("hosp0"), run_id=..., ...)    # the site itself
    session.auth.record_decisions([...], run_id=..., round_index=r)                  # 1 tx per round
    anchor, manifest = build_round_anchor(store, run_id=..., round_index=r, ...)
    session.data.anchor_round(anchor)                                                # 1 tx per round

Writes return a `WriteReceipt`; status "queued" means the chain was unreachable and the write is in
the durable outbox (replayed in order by the next write or `session.flush()`).
"""

from __future__ import annotations

from .anchoring import RoundManifest, build_round_anchor
from .auth_chain import MAX_DECISIONS_PER_TX, AuthChain
from .data_chain import DataChain
from .records import Decision, RoundAnchor, RoundStatus, RunRegistration, WriteReceipt
from .session import ChainSession, open_readonly, open_session

__all__ = [
    "MAX_DECISIONS_PER_TX",
    "AuthChain",
    "ChainSession",
    "DataChain",
    "Decision",
    "RoundAnchor",
    "RoundManifest",
    "RoundStatus",
    "RunRegistration",
    "WriteReceipt",
    "build_round_anchor",
    "open_readonly",
    "open_session",
]
