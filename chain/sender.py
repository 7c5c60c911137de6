"""One background sender per chain: the coordinator's round writes leave its critical path.

A round's writes (decisions, dataset commitments, anchor) are made durable first — appended, fsynced, to
the chain's journal and outbox by `ContractGateway.write(..., background=True)` — and the round loop goes
on at once. This thread then sends what the outbox holds, in order, one transaction at a time: it is the
only sender of queued writes in this process, so nonces and order stay those of the outbox. A crash
between the durable record and the send loses nothing: the next start (or `medtwin chain flush`)
reconciles, checking each entry against the chain before sending it, so nothing is written twice.

While the chain is unreachable the sender retries every `retry_s`; the entries wait in the outbox like
any outage's writes (`outage_problem` sees their age). A write the chain refuses moves to the outbox's
failed file and to `gateway.refused_in_background`: the run stops on it (`ChainProvenance.outage_problem`)
and its summary lists it, as a synchronous refusal raised at once. `drain` waits until the outbox is empty or the
sender cannot make progress (the end of a run: what is left is reported as queued).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from .errors import ChainError, OutboxError

if TYPE_CHECKING:
    from .writer import ContractGateway

__all__ = ["BackgroundSender"]

log = logging.getLogger(__name__)


class BackgroundSender:
    """Sends one gateway's queued writes on a daemon thread; `wake` after each durable append."""

    def __init__(self, gateway: ContractGateway, *, retry_s: float = 2.0) -> None:
        self.gateway = gateway
        self.retry_s = retry_s
        self.send_s = 0.0  # seconds spent sending (off the round's critical path), summed
        self.sent = 0  # writes this sender put on chain
        self.failed: list[str] = []  # writes the chain refused (kept in the outbox's failed file and the gateway's list)
        self._wake = threading.Event()
        self._state = threading.Condition()
        self._busy = False
        self._stalled = False  # the last attempt left writes queued (chain unreachable, or a signer missing)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"medtwin-{gateway.client.name}-sender", daemon=True)
        self._thread.start()

    @property
    def stalled(self) -> bool:
        return self._stalled

    def wake(self) -> None:
        with self._state:
            self._busy = True  # a wake-up always leads to one more pass: `drain` must not return before it
        self._wake.set()

    def drain(self, *, timeout_s: float) -> int:
        """Wait until every queued write is sent, the sender is stalled, or `timeout_s` passed; the writes left."""
        self.wake()
        deadline = time.monotonic() + timeout_s
        with self._state:
            while self._busy and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._state.wait(remaining)
        return self.gateway.queued_count()

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Finish the pass under way, then end the thread (queued writes stay in the outbox)."""
        with self._state:
            self._stopping = True
            self._state.notify_all()
        self._wake.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.retry_s if self._stalled else None)
            self._wake.clear()
            if self._stopping:
                return
            started = time.perf_counter()
            try:
                before = self._queued_keys()
                result = self.gateway.send_queued()
                self.sent += len(result.mined)
                self.failed.extend(result.failed)
                self.gateway.refused_in_background.extend(result.failed)
                # stalled: a write queued before this pass is still there (one handed off during it is not a stall)
                stalled = bool(before & self._queued_keys())
            except (ChainError, OutboxError, OSError, ValueError) as error:  # the writes stay durable in the outbox
                log.error("%s chain: background send failed (%s); retrying in %.0f s", self.gateway.client.name, error, self.retry_s)
                stalled = True
            except Exception:  # noqa: BLE001 — the thread must survive anything; the writes stay in the outbox
                log.exception("%s chain: background send failed unexpectedly; retrying in %.0f s", self.gateway.client.name, self.retry_s)
                stalled = True
            self.send_s += time.perf_counter() - started
            with self._state:
                self._stalled = stalled
                if not self._wake.is_set():  # nothing new arrived during the pass
                    self._busy = False
                    self._state.notify_all()

    def _queued_keys(self) -> set[tuple[int, float, int]]:
        outbox = self.gateway.outbox
        return {(entry.seq, entry.queued_at, entry.journal_seq) for entry in outbox.pending()} if outbox is not None else set()
