"""Durable journal: every chain write made from one chain state folder, in order, so that writes a
node lost (killed between two of its state dumps) are found and sent again.

One append-only JSONL file per chain (``journal-<role>.jsonl``); each write is appended and fsynced
*before* it is sent or queued, and a short ``{"mined": seq, "tx_hash": …}`` line follows once it is
mined: a write is lost when its transaction's receipt is gone (not when the chain's state differs —
a later write may have undone it on purpose). A watermark (``journal-<role>.watermark.json``, written atomically)
keeps two points, each an entry number with the block (number and hash) at which it was checked:

- verified: every entry up to here was seen applied on chain when the chain head was that block;
- durable: the same, and the node's durable block has since reached that block (anvil: its state
  dump holds it; rpc: the configured confirmations deep) — those writes are ``finalized``.

A reconcile re-checks only the entries after the durable point, unless the chain no longer has the
durable block's hash (a node restored from an older state, a reorg): then it re-checks everything.
An entry's number comes from the file's last entry, and never goes below one this `Journal` already handed
out (a line appended by someone else with an old number does not make this process reuse it).
Appends and watermark updates happen under the outbox's file lock (`Outbox.files_locked`, the gateway sets
`guard`): a background sender marks entries mined while the round loop appends new ones.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from medtwin.core.rundir import atomic_write_bytes

from .errors import OutboxError
from .outbox import encode_args, is_integer, typed_entry

__all__ = ["Journal", "JournalEntry", "Watermark", "anvil_durable_block"]

FILE_MODE = 0o600
TAIL_BYTES = 1 << 16


@dataclass(frozen=True)
class JournalEntry:
    seq: int
    method: str
    args: list[Any]  # JSON form (see outbox.encode_args)
    sender: str
    signer_label: str
    at: float
    tx_hash: str = ""  # from the entry's latest "mined" line: the transaction that put it on chain


@dataclass(frozen=True)
class Watermark:
    durable_seq: int = 0
    durable_block: int = 0
    durable_hash: str = ""
    verified_seq: int = 0
    verified_block: int = 0
    verified_hash: str = ""
    refused: tuple[int, ...] = field(default=())  # entries the chain refused when re-sent (reported, not retried)


# the JSON type of each field of an entry line (a number is never a bool, a float or a string of digits)
ENTRY_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "seq": int, "method": str, "args": list, "sender": str, "signer_label": str, "at": (int, float), "tx_hash": str,
}  # fmt: skip


def _entry_from_record(record: Any) -> JournalEntry:
    """An entry line as `Journal.append` writes it; TypeError (naming the fields) for anything else."""
    return typed_entry(JournalEntry(**record), ENTRY_FIELD_TYPES)


class Journal:
    """The ordered record of one chain's writes from this state folder."""

    def __init__(self, path: str | os.PathLike[str], *, chain: str) -> None:
        self.path = Path(path)
        self.chain = chain
        self.watermark_path = self.path.with_name(self.path.name.removesuffix(".jsonl") + ".watermark.json")
        # held around every change (the outbox's file lock, set by the gateway): appends from two threads
        self.guard: Callable[[], AbstractContextManager[None]] = nullcontext
        self._last_handed_out = 0  # the highest seq this instance appended

    def append(self, *, method: str, args: list[Any], sender: str, signer_label: str = "") -> JournalEntry:
        with self.guard():
            seq = max(self.last_seq(), self._last_handed_out) + 1
            entry = JournalEntry(seq, method, encode_args(args), sender, signer_label, time.time())
            record = asdict(entry)
            del record["tx_hash"]
            self._append_line(record)
            self._last_handed_out = seq
            return entry

    def mark_mined(self, seq: int, *, tx_hash: str, block: int) -> None:
        with self.guard():
            self._append_line({"mined": seq, "tx_hash": tx_hash, "block": block})

    def _append_line(self, record: dict[str, Any]) -> None:
        created = not self.path.exists()
        self._cut_torn_tail()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            os.write(descriptor, (json.dumps(record, sort_keys=True) + "\n").encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        if created:  # the new file's name is durable too
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def _cut_torn_tail(self) -> None:
        """A crash mid-append leaves a last line without its newline (never sent: the fsync comes first);
        cut it off so that the next line does not run into it."""
        if not self.path.is_file():
            return
        with self.path.open("r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            position = size
            while position > 0:
                start = max(0, position - TAIL_BYTES)
                handle.seek(start)
                newline = handle.read(position - start).rfind(b"\n")
                if newline >= 0:
                    handle.truncate(start + newline + 1)
                    break
                position = start
            else:
                handle.truncate(0)
            handle.flush()
            os.fsync(handle.fileno())

    def last_seq(self) -> int:
        """The last entry's number, read from the file's tail (the journal only grows)."""
        if not self.path.is_file():
            return 0
        with self.path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - TAIL_BYTES))
            lines = handle.read().splitlines()
        for line in reversed(lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a torn last line (never sent) or a partial first line of the tail
            if isinstance(record, dict) and is_integer(record.get("seq")):
                return record["seq"]  # else a "mined" line, or one this code does not write (`entries` names it)
        entries = self.entries()  # one entry longer than the tail
        return entries[-1].seq if entries else 0

    def entries(self, *, after: int = 0) -> list[JournalEntry]:
        if not self.path.is_file():
            return []
        lines = self.path.read_text(encoding="utf-8").split("\n")
        entries: dict[int, JournalEntry] = {}
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if isinstance(record, dict) and "mined" in record:
                    seq, tx_hash = record["mined"], record["tx_hash"]
                    if not is_integer(seq) or not isinstance(tx_hash, str):
                        raise TypeError("mined or tx_hash of the wrong type")
                    if seq in entries:
                        entries[seq] = replace(entries[seq], tx_hash=tx_hash)
                    continue
                entry = _entry_from_record(record)
            except (ValueError, TypeError, KeyError) as error:
                if number == len(lines):  # no newline after it: torn by a crash before its fsync, never sent
                    break
                raise OutboxError(
                    f"{self.path} line {number} is not a valid journal entry ({error}); the journal lists chain writes "
                    "to re-send after a node loses state — restore the line from a backup or remove it and run "
                    "`medtwin audit verify` on the affected runs"
                ) from error
            if entry.seq > after:
                entries[entry.seq] = entry
        return list(entries.values())

    def watermark(self) -> Watermark:
        if not self.watermark_path.is_file():
            return Watermark()
        try:
            data = json.loads(self.watermark_path.read_text(encoding="utf-8"))
            return Watermark(**{**data, "refused": tuple(data.get("refused", ()))})
        except (ValueError, TypeError) as error:
            raise OutboxError(
                f"{self.watermark_path} is damaged ({error}); delete it — the next reconcile re-checks every journal entry"
            ) from error

    def set_watermark(self, watermark: Watermark) -> None:
        with self.guard():
            atomic_write_bytes(self.watermark_path, json.dumps(asdict(watermark), sort_keys=True).encode(), mode=FILE_MODE)


def anvil_durable_block(state_file: str | os.PathLike[str]) -> int:
    """The highest block in anvil's last state dump (what a restarted node comes back with); -1 if none."""
    try:
        best = json.loads(Path(state_file).read_text(encoding="utf-8"))["best_block_number"]
        return int(best, 0) if isinstance(best, str) else int(best)
    except (OSError, ValueError, KeyError, TypeError):
        return -1  # not dumped yet, or caught mid-write: nothing is known durable
