"""Durable outbox: chain writes that could not be sent wait here, in order, until the chain is back.

One JSONL file per chain (``outbox-auth.jsonl``, ``outbox-data.jsonl``). Appends are fsynced;
removals rewrite the file atomically (temp file, fsync, rename); a lock file serialises processes.
Entries that the chain refuses on replay move to ``<name>.failed.jsonl`` and are reported, never
dropped silently. The replay logic (idempotency checks, sending) lives in the gateway.

Numbers (`seq`) are never handed out twice: a removal's rewrite starts the file with ``{"last_seq": N}``,
the highest number the outbox has held, so numbering goes on after the outbox empties (no extra fsync: the
rewrite is fsynced anyway), and an `Outbox` also remembers the highest number it handed out, whatever the
file says later. Files from before that line load as they are. A number is still no proof of who wrote the
line (anyone who can write the file can reuse one): the gateway tells its own entries by their content.

Two locks: `locked()` is held by whoever sends or replays queued writes (for as long as that takes);
`files_locked()` only for a read or change of the files themselves (milliseconds). A background sender
holds the first while a transaction mines, so the round loop's hand-off takes only the second: it never
waits for a send under way, and no append is lost to a removal's rewrite of the file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medtwin.core.rundir import atomic_write_bytes, exclusive_lock

from .errors import OutboxError

__all__ = ["Outbox", "PendingWrite", "decode_args", "encode_args"]

FILE_MODE = 0o600
TAIL_BYTES = 1 << 16  # an append reads the outbox's last line from this much of its end
LAST_SEQ_PREFIX = '{"last_seq": '  # a removal's first line: the highest number the outbox has held


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


# the JSON type of each field of an outbox line (a number is never a bool, a float or a string of digits)
ENTRY_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "seq": int, "chain": str, "method": str, "args": list, "sender": str, "queued_at": (int, float), "reason": str,
    "signer_label": str, "journal_seq": int,
}  # fmt: skip


def is_integer(value: Any) -> bool:
    """A JSON integer (a bool is not one, though Python says so)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(value: Any) -> int | None:
    return value if is_integer(value) else None


def typed_entry(entry: Any, field_types: dict[str, type | tuple[type, ...]]) -> Any:
    """`entry` (a dataclass read from a line), if each field in `field_types` has that type (a bool never counts
    as a number); TypeError naming the fields that do not."""
    wrong = [name for name, kind in field_types.items() if isinstance(getattr(entry, name), bool) or not isinstance(getattr(entry, name), kind)]
    if wrong:
        raise TypeError(f"{', '.join(wrong)} of the wrong type")
    return entry


def _entry_from_line(line: str | bytes) -> PendingWrite:
    """One outbox line as this code writes it; ValueError / TypeError (naming the field) for anything else."""
    return typed_entry(PendingWrite(**json.loads(line)), ENTRY_FIELD_TYPES)


def _last_seq_from_line(line: str | bytes) -> int:
    """The number in a removal's first line, exactly ``{"last_seq": <integer>}``; ValueError for anything else."""
    record = json.loads(line)
    number = _integer(record.get("last_seq")) if isinstance(record, dict) and set(record) == {"last_seq"} else None
    if number is None:
        raise ValueError('not {"last_seq": <integer>}')
    return number


def _recorded_last_seq(head: bytes) -> int:
    """The ``last_seq`` a removal wrote at the top of the file (0 in files from before it did)."""
    if not head.startswith(LAST_SEQ_PREFIX.encode()):
        return 0
    try:
        return _last_seq_from_line(head[: head.index(b"\n")])
    except ValueError:
        return 0  # not that line after all: the full read names a damaged line


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
        self._files_held = threading.local()  # this thread's depth in `files_locked` (re-entrant per thread)
        self._failed_max_seq: tuple[tuple[int, int], int] | None = None  # ((size, mtime) of the failed file, its highest seq)
        self._last_handed_out = 0  # the highest seq this instance appended: never handed out again, whatever the file says

    def locked(self) -> AbstractContextManager[None]:
        """Hold the cross-process sending lock (flock on a sibling .lock file): whoever sends or replays queued writes."""
        return exclusive_lock(self.path.with_name(self.path.name + ".lock"))

    @contextmanager
    def files_locked(self) -> Iterator[None]:
        """Hold the short lock on the files (flock on a sibling .files.lock): a consistent read, or one change.
        Re-entrant within a thread; taken after `locked()` when both are needed, never before it."""
        depth = getattr(self._files_held, "depth", 0)
        if depth:
            self._files_held.depth = depth + 1
            try:
                yield
            finally:
                self._files_held.depth = depth
            return
        with exclusive_lock(self.path.with_name(self.path.name + ".files.lock")):
            self._files_held.depth = 1
            try:
                yield
            finally:
                self._files_held.depth = 0

    def _read(self, path: Path) -> list[PendingWrite]:
        if not path.is_file():
            return []
        text = path.read_text(encoding="utf-8")
        if not text.endswith("\n"):  # a line still being appended (another thread's hand-off), or torn by a crash
            text = text[: text.rfind("\n") + 1]  # before its fsync — never a write whose call returned
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                if number == 1 and line.startswith(LAST_SEQ_PREFIX):
                    _last_seq_from_line(line)  # a removal's first line, checked like any other
                    continue
                entries.append(_entry_from_line(line))
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
        """Queue one write after every write already queued."""
        with self.files_locked():
            return self._append_locked(
                method=method, args=args, sender=sender, reason=reason, signer_label=signer_label, journal_seq=journal_seq
            )  # fmt: skip

    def _append_locked(self, *, method: str, args: list[Any], sender: str, reason: str, signer_label: str, journal_seq: int) -> PendingWrite:
        entry = PendingWrite(
            seq=max(self._last_pending_seq(), self._failed_seq(), self._last_handed_out) + 1,
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
        self._last_handed_out = entry.seq
        return entry

    def _last_pending_seq(self) -> int:
        """The highest seq the outbox file has held: its last complete line's (appends number upwards and removals
        keep the order) or its first line's ``last_seq``, whichever is higher — a hand-off reads a few bytes, not
        the backlog an outage left. A torn last line (a crash before its fsync: never returned from an append) is
        cut off first, so the next line does not run into it (caller holds `files_locked`)."""
        if not self.path.is_file():
            return 0
        with self.path.open("r+b") as handle:
            recorded = _recorded_last_seq(handle.read(len(LAST_SEQ_PREFIX) + 24))
            size = handle.seek(0, os.SEEK_END)
            start = max(0, size - TAIL_BYTES)
            handle.seek(start)
            tail = handle.read()
            if tail and not tail.endswith(b"\n") and (start == 0 or b"\n" in tail):
                handle.truncate(start + tail.rfind(b"\n") + 1)
                handle.flush()
                os.fsync(handle.fileno())
                tail = tail[: tail.rfind(b"\n") + 1]
        complete = tail.splitlines()
        if complete and tail.endswith(b"\n") and (start == 0 or len(complete) > 1):  # a partial tail's first line may be cut
            try:
                last = json.loads(complete[-1])
            except ValueError:
                last = None
            number = _integer(last.get("seq", last.get("last_seq"))) if isinstance(last, dict) else None
            if number is not None:
                return max(number, recorded)
            # a line edited by hand: the full read names it
        return max([recorded, *(item.seq for item in self.pending())])

    def _failed_seq(self) -> int:
        """The highest seq in the failed file, read again only when it grew (refusals append to it; nothing removes)."""
        stat = self.failed_path.stat() if self.failed_path.is_file() else None
        version = (stat.st_size, stat.st_mtime_ns) if stat is not None else (0, 0)
        if self._failed_max_seq is None or self._failed_max_seq[0] != version:
            self._failed_max_seq = (version, max((item.seq for item in self.failed()), default=0))
        return self._failed_max_seq[1]

    def remove(self, seq: int) -> None:
        """Drop a write that is now on chain (caller holds `locked()`). The rewrite keeps the highest number the
        outbox has held in its first line, so that no later append hands the number out again."""
        with self.files_locked():  # a hand-off's append between the read and the rewrite would be lost
            entries = self.pending()
            last_seq = max(self._last_pending_seq(), self._last_handed_out, *(item.seq for item in entries))
            lines = [json.dumps({"last_seq": last_seq}), *(json.dumps(asdict(item), sort_keys=True) for item in entries if item.seq != seq)]
            _atomic_write(self.path, "".join(line + "\n" for line in lines))

    def move_to_failed(self, seq: int, *, error: str) -> PendingWrite:
        """The chain refused a queued write: keep it, with the error, in the failed file."""
        with self.files_locked():
            entry = next((item for item in self.pending() if item.seq == seq), None)
            if entry is None:
                raise OutboxError(f"outbox {self.path} has no entry with seq {seq}")
            failed = PendingWrite(**{**asdict(entry), "reason": f"{entry.reason}; replay refused: {error}".lstrip("; ")})
            _append_line(self.failed_path, asdict(failed))
            self.remove(seq)
            return failed
