"""A site's signed replies, kept so a repeated instruction gets the same reply instead of a second spend.

A coordinator that crashed after a site trained round r sends round r again when it resumes. Training it
again would spend the site's privacy budget a second time, so the ledger refuses that; without the reply
the site produced, the round would go on without it. So the site keeps every signed reply it sends in its
own state folder — written atomically before it is sent — keyed by run, phase, round and the aggregate
the phase started from. An instruction that repeats one of them (same run, phase, round and verified
starting aggregate) is answered with the stored reply, unchanged: nothing is trained, evaluated or
released again. An instruction for the same round from any other starting point finds nothing here and
is refused by the ledger (`refused:replay`) or the evaluation register as before.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from medtwin.core.ids import ensure_id
from medtwin.core.rundir import atomic_write_text

__all__ = ["ReplyStore"]

logger = logging.getLogger("medtwin.site")

FORMAT = 1


class ReplyStore:
    """`<state_dir>/replies/<run_id>/<phase>-<round>.json`: one signed reply per (run, phase, round)."""

    def __init__(self, state_dir: Path | str) -> None:
        self.root = Path(state_dir) / "replies"

    def _path(self, run_id: str, phase: str, server_round: int) -> Path:
        ensure_id(run_id, key="run_id")
        if phase not in ("train", "evaluate", "statistics"):
            raise ValueError(f"phase must be train, evaluate or statistics, got {phase!r}")
        return self.root / run_id / f"{phase}-{int(server_round):06d}.json"

    def save(self, run_id: str, phase: str, server_round: int, *, started_from: str, content: RecordDict) -> None:
        """Keep the reply; a failure to write (disk full, read-only) is logged, never lost: the reply still
        goes out, only a later repeat of this instruction will be refused instead of answered."""
        document = {"format": FORMAT, "started_from": started_from, "content": _encode(content)}
        path = self._path(run_id, phase, server_round)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_text(path, json.dumps(document, sort_keys=True), mode=0o600)
        except OSError as error:
            logger.error("could not keep the %s reply of round %d in %s (%s)", phase, server_round, path, error.strerror or error)

    def load(self, run_id: str, phase: str, server_round: int, *, started_from: str) -> RecordDict | None:
        """The reply sent for exactly this instruction, or None (never sent, sent from another start, or the
        stored file is damaged — then the ledger and the evaluation register decide, which refuse a repeat)."""
        path = self._path(run_id, phase, server_round)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            logger.error("stored reply %s is unreadable (%s); not resending it", path, error)
            return None
        if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("started_from") != started_from:
            return None
        try:
            return _decode(document["content"])
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as error:
            logger.error("stored reply %s is damaged (%s); not resending it", path, type(error).__name__)
            return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _value_out(value: object) -> object:
    if isinstance(value, bytes):
        return {"b64": _b64(value)}
    if isinstance(value, list):
        return [_value_out(item) for item in value]
    return value


def _value_in(value: object) -> object:
    if isinstance(value, dict):
        return base64.b64decode(value["b64"], validate=True)
    if isinstance(value, list):
        return [_value_in(item) for item in value]
    return value


def _encode(content: RecordDict) -> dict:
    encoded: dict[str, dict] = {}
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays = [[name, array.dtype, list(array.shape), array.stype, _b64(array.data)] for name, array in record.items()]
            encoded[key] = {"type": "array", "arrays": arrays}
        elif isinstance(record, MetricRecord):
            encoded[key] = {"type": "metric", "values": dict(record)}
        elif isinstance(record, ConfigRecord):
            encoded[key] = {"type": "config", "values": {name: _value_out(value) for name, value in record.items()}}
        else:
            raise TypeError(f"cannot store a reply record of type {type(record).__name__}")
    return encoded


def _decode(encoded: dict) -> RecordDict:
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
    for key, record in encoded.items():
        if record["type"] == "array":
            records[key] = ArrayRecord(
                {
                    name: Array(dtype=dtype, shape=tuple(shape), stype=stype, data=base64.b64decode(data, validate=True))
                    for name, dtype, shape, stype, data in record["arrays"]
                }
            )
        elif record["type"] == "metric":
            records[key] = MetricRecord(record["values"])
        else:
            records[key] = ConfigRecord({name: _value_in(value) for name, value in record["values"].items()})
    return RecordDict(records)
