"""Durable outbox: chain writes that could not be sent wait here, in order, until the chain is back.

One JSONL file per chain (``outbox-auth.jsonl``, ``outbox-data.jsonl``). Appends are fsynced;
removals rewrite the file atomically (temp file, fsync, rename); a lock file serialises processes.
Entries that the chain refuses on replay move to ``<name>.failed.jsonl`` and are reported, never
dropped silently. The replay logic (idempotency checks, sending) lives in the gateway.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medtwin.core.rundir import atomic_write_bytes, exclusive_lock

from .errors import OutboxError

__all__ = ["Outbox", "PendingWrite", "decode_args", "encode_args"]

FILE_MODE = 0o600


@dataclass(frozen=True)
class PendingWrite:
    seq: int
    chain: str
    method: str
    args: list[Any]  # JSON form, see encode_args
    sender: str  # address that must sign the replay
    queued_at: float
    reason: str = ""  # why it was queued (the outage message)
    signer_label: str = ""  # e.g. "coordinator", "site:hosp0" — lets a new process find the key
    journal_seq: int = 0  # the same write's entry in the chain's journal (0: written before journals)


def encode_args(args: list[Any]) -> list[Any]:
    """Contract arguments in JSON form: bytes become {"b": hex}, lists recurse."""

    def encode(value: Any) -> Any:
        if isinstance(value, bytes | bytearray):
            return {"b": bytes(value).hex()}
        if isinstance(value, list | tuple):
            return [encode(item) for item in value]
        if isinstance(value, bool | int | str) or value is None:
            return value
        raise OutboxError(f"cannot queue contract argument of type {type(value).__name__}: {value!r}")

    return [encode(arg) for arg in args]


def decode_args(args: list[Any]) -> list[Any]:
    def decode(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"b"}:
            return bytes.fromhex(value["b"])
        if isinstance(value, list):
            return [decode(item) for item in value]
        return value

    return [decode(arg) for arg in args]


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=FILE_MODE)


def _append_line(path: Path, entry: dict[str, Any]) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    try:
        os.write(descriptor, (json.dumps(entry, sort_keys=True) + "\n").encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Outbox:
    """An ordered, durable queue of writes for one chain."""

    def __init__(self, path: str | os.PathLike[str], *, chain: str) -> None:
        self.path = Path(path)
        self.chain = chain
        self.failed_path = self.path.with_name(self.path.name.removesuffix(".jsonl") + ".failed.jsonl")

    def locked(self) -> AbstractContextManager[None]:
        """Hold the cross-process lock (flock on a sibling .lock file)."""
        return exclusive_lock(self.path.with_name(self.path.name + ".lock"))

    def _read(self, path: Path) -> list[PendingWrite]:
        if not path.is_file():
            return []
        entries = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append(PendingWrite(**json.loads(line)))
            except (ValueError, TypeError) as error:
                raise OutboxError(
                    f"{path} line {number} is not a valid outbox entry ({error}) — fix or move the line by hand; "
                    "it is a chain write that has not been sent"
                ) from error
        return entries

    def pending(self) -> list[PendingWrite]:
        return self._read(self.path)

    def failed(self) -> list[PendingWrite]:
        return self._read(self.failed_path)

    def __len__(self) -> int:
        return len(self.pending())

    def append(
        self, *, method: str, args: list[Any], sender: str, reason: str = "", signer_label: str = "", journal_seq: int = 0
    ) -> PendingWrite:
        """Queue one write after every write already queued (caller holds `locked()`)."""
        existing = self.pending() + self.failed()
        entry = PendingWrite(
            seq=max((item.seq for item in existing), default=0) + 1,
            chain=self.chain,
            method=method,
            args=encode_args(args),
            sender=sender,
            queued_at=time.time(),
            reason=reason,
            signer_label=signer_label,
            journal_seq=journal_seq,
        )
        _append_line(self.path, asdict(entry))
        return entry

    def remove(self, seq: int) -> None:
        """Drop a write that is now on chain (caller holds `locked()`)."""
        remaining = [item for item in self.pending() if item.seq != seq]
        _atomic_write(self.path, "".join(json.dumps(asdict(item), sort_keys=True) + "\n" for item in remaining))

    def move_to_failed(self, seq: int, *, error: str) -> PendingWrite:
        """The chain refused a queued write: keep it, with the error, in the failed file."""
        entry = next((item for item in self.pending() if item.seq == seq), None)
        if entry is None:
            raise OutboxError(f"outbox {self.path} has no entry with seq {seq}")
        failed = PendingWrite(**{**asdict(entry), "reason": f"{entry.reason}; replay refused: {error}".lstrip("; ")})
        _append_line(self.failed_path, asdict(failed))
        self.remove(seq)
        return failed
