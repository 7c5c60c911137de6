"""What travels in Flower messages between coordinator and sites: record names, claims, certificates.

A site's update contributes n_i * w_i (its weights times its sample count) and n_i to a sum; the
coordinator only ever sums updates, and sites divide a sum by its count to get the average. With
`crypto=plain` an update carries the site's float32 weights and integer count, and summing forms the
products in float64 (core/plain_payload.py); CKKS encrypts [n_i * w_i ..., n_i] as ciphertext chunks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from .identity.errors import SignatureError
from .identity.signing import ReplyClaim

# record names inside a Message's RecordDict
INSTRUCTION = "medtwin.instruction"  # ConfigRecord: run_id, round, phase, ...
ROUND_INPUTS = "medtwin.round_inputs"  # ArrayRecord: AGGREGATE and the CERTIFIED_PREFIX updates as one bytes array (pack_payloads)
AGGREGATE = "medtwin.aggregate"  # inside ROUND_INPUTS: summed payload of the previous round (absent in round 1)
UPDATE = "medtwin.update"  # ArrayRecord: a site's payload
SITE = "medtwin.site"  # ConfigRecord: site_id, status, reason
METRICS = "medtwin.metrics"  # MetricRecord: training or evaluation metrics
SCORE_HISTOGRAM = "medtwin.score_histogram"  # MetricRecord: a binary site's per-class score histogram (core/score_histogram.py)
CERTIFICATE = "medtwin.certificate"  # ConfigRecord: the signed claims behind the AGGREGATE (see RoundCertificate)
CERTIFIED_PREFIX = "medtwin.certified."  # inside ROUND_INPUTS: the certified updates themselves, so each site sums them
# task.normalization=federated: the statistics phase before round 1 (core/tasks/federated_statistics.py) is a
# "round 0" of updates with status "statistics"; its sum, certificate and certified updates ride with every later message
STATISTICS_ROUND = 0
STATISTICS_STATUS = "statistics"
STATISTICS_INPUTS = "medtwin.statistics.inputs"  # ArrayRecord: STATISTICS_AGGREGATE and its certified updates (pack_payloads)
STATISTICS_AGGREGATE = "medtwin.statistics.aggregate"  # inside STATISTICS_INPUTS: the summed statistics
STATISTICS_CERTIFICATE = "medtwin.statistics.certificate"  # ConfigRecord: a RoundCertificate of round 0
STATISTICS_CERTIFIED_PREFIX = "medtwin.statistics.certified."  # inside STATISTICS_INPUTS: the certified statistics updates


def instruction(*, run_id: str, server_round: int, phase: str) -> ConfigRecord:
    return ConfigRecord({"run_id": run_id, "round": server_round, "phase": phase})


CKKS_STYPE = "medtwin.ckks"


def chunks_to_record(chunks: list[bytes]) -> ArrayRecord:
    """Opaque ciphertext chunks as an ArrayRecord (Flower carries bytes arrays untouched)."""
    return ArrayRecord(
        {f"chunk-{index:05d}": Array(dtype="bytes", shape=(len(chunk),), stype=CKKS_STYPE, data=chunk) for index, chunk in enumerate(chunks)}
    )


def record_to_chunks(record: ArrayRecord) -> list[bytes]:
    return [record[name].data for name in sorted(record) if name.startswith("chunk-")]


RECORD_MAGIC = b"medtwin/payload/v1\x00"


def record_bytes(record: ArrayRecord) -> bytes:
    """A canonical byte string of a payload record: what the artifact store keeps and the chain anchors."""
    parts = [RECORD_MAGIC]
    for name in sorted(record):
        array = record[name]
        for field in (name.encode(), array.dtype.encode(), repr(tuple(array.shape)).encode(), array.stype.encode(), array.data):
            parts.append(len(field).to_bytes(8, "big"))
            parts.append(field)
    return b"".join(parts)


def record_from_bytes(data: bytes | memoryview) -> ArrayRecord:
    """Inverse of `record_bytes` (for auditors, the simulation harness and `unpack_payloads`); raises
    `ValueError` on anything that `record_bytes` cannot have written."""
    view = memoryview(data)
    if bytes(view[: len(RECORD_MAGIC)]) != RECORD_MAGIC:
        raise ValueError("not a medtwin payload artifact (bad magic)")
    fields = _length_prefixed(view[len(RECORD_MAGIC) :], what="payload record")
    if len(fields) % 5:
        raise ValueError(f"a payload record holds {len(fields)} fields, not 5 per array")
    arrays = {}
    for index in range(0, len(fields), 5):
        name, dtype, shape, stype, blob = fields[index : index + 5]
        text = bytes(shape).decode()
        dims = tuple(int(part) for part in text.strip("(),").split(",") if part.strip())
        if repr(dims) != text:  # "1_0", " 3", "((3,),)", "" all parse: only record_bytes' own spelling is one
            raise ValueError(f"array {index // 5}: shape {text[:40]!r} is not written as record_bytes writes {dims!r:.40}")
        array_name = bytes(name).decode()
        if arrays and array_name <= next(reversed(arrays)):  # record_bytes writes names sorted, each once
            raise ValueError(f"array {array_name[:60]!r} is out of order or repeated")
        arrays[array_name] = Array(dtype=bytes(dtype).decode(), shape=dims, stype=bytes(stype).decode(), data=bytes(blob))
    return ArrayRecord(arrays)


def _length_prefixed(view: memoryview, *, what: str) -> list[memoryview]:
    """Split 8-byte big-endian length-prefixed fields (views, no copies); `ValueError` if one overruns."""
    fields: list[memoryview] = []
    offset = 0
    while offset < len(view):
        if offset + 8 > len(view):
            raise ValueError(f"the {what} ends inside a length field (at byte {offset} of {len(view)})")
        length = int.from_bytes(view[offset : offset + 8], "big")
        if offset + 8 + length > len(view):
            raise ValueError(f"the {what} is truncated: a field of {length} bytes at byte {offset} of {len(view)}")
        fields.append(view[offset + 8 : offset + 8 + length])
        offset += 8 + length
    return fields


PAYLOADS_MAGIC = b"medtwin/payloads/v1\x00"
PAYLOADS_STYPE = "medtwin.payloads"


class MalformedPayloads(ValueError):
    """A message's packed payload records (ROUND_INPUTS, STATISTICS_INPUTS) cannot be read."""


def pack_payloads(records: Mapping[str, ArrayRecord]) -> ArrayRecord:
    """Named payload records as ONE bytes array: a message then carries 3 Flower objects for all of them
    (ArrayRecord, Array, ArrayChunk) instead of 3 per record, and each object is a separate pull
    between SuperLink, SuperNode and ClientApp. Each record keeps its canonical `record_bytes`, so its
    digest (`payload_sha256`) is the same packed or not; identical contents pack to identical bytes, so
    every site's message of a phase shares the object."""
    parts = [PAYLOADS_MAGIC]
    for name in sorted(records):
        for field in (name.encode(), record_bytes(records[name])):
            parts.append(len(field).to_bytes(8, "big"))
            parts.append(field)
    blob = b"".join(parts)
    return ArrayRecord({"payloads": Array(dtype="bytes", shape=(len(blob),), stype=PAYLOADS_STYPE, data=blob)})


def unpack_payloads(content: RecordDict, name: str) -> dict[str, ArrayRecord]:
    """The payload records packed under `name` in a message ({} if it has none); `MalformedPayloads` if
    what is there is not what `pack_payloads` writes (the sender is a peer: nothing here may crash)."""
    if name not in content:
        return {}
    record = content.array_records.get(name)
    array = record.get("payloads") if record is not None and len(record) == 1 else None
    if array is None or array.dtype != "bytes" or array.stype != PAYLOADS_STYPE:
        raise MalformedPayloads(f"{name} is not one '{PAYLOADS_STYPE}' bytes array")
    view = memoryview(array.data)
    if bytes(view[: len(PAYLOADS_MAGIC)]) != PAYLOADS_MAGIC:
        raise MalformedPayloads(f"{name} does not start with {PAYLOADS_MAGIC!r}")
    records: dict[str, ArrayRecord] = {}
    try:
        fields = _length_prefixed(view[len(PAYLOADS_MAGIC) :], what=name)
        if len(fields) % 2:
            raise ValueError(f"{len(fields)} fields, not (name, record) pairs")
        for index in range(0, len(fields), 2):
            record_name = bytes(fields[index]).decode()
            if record_name in records:
                raise ValueError(f"the record {record_name!r} appears twice")
            if records and record_name < next(reversed(records)):  # pack_payloads writes names sorted
                raise ValueError(f"the record {record_name[:60]!r} is out of order")
            records[record_name] = record_from_bytes(fields[index + 1])
    except ValueError as error:  # UnicodeDecodeError is one
        raise MalformedPayloads(f"{name} is malformed: {str(error)[:200]}") from None
    return records


def payload_sha256(record: ArrayRecord) -> str:
    """Hex sha256 of a payload record's canonical bytes: what a site signs and the artifact store keys."""
    return hashlib.sha256(record_bytes(record)).hexdigest()


def metrics_sha256(metrics: dict[str, float]) -> str:
    """Hex sha256 of an evaluation's metrics as canonical JSON: what a site signs in an "evaluate" claim."""
    return hashlib.sha256(json.dumps(metrics, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def evaluation_sha256(metrics: dict[str, float], score_histogram: dict[str, list] | None = None) -> str:
    """Hex sha256 of what an evaluation reply releases: its metrics and, when it sends one, its score
    histogram (the SCORE_HISTOGRAM record's lists), as canonical JSON. Without a histogram this is
    `metrics_sha256(metrics)`, so a reply that carries none is signed as before."""
    if score_histogram is None:
        return metrics_sha256(metrics)
    document = {"metrics": metrics, "score_histogram": score_histogram}
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


MAX_CLAIM_JSON = 4096


def site_reply_record(claim: ReplyClaim, signature: bytes, *, reason: str = "") -> ConfigRecord:
    """The SITE record of every reply: the signed claim (canonical JSON), its signature, a reason."""
    return ConfigRecord(
        {
            "claim": json.dumps(claim.to_dict(), sort_keys=True),
            "signature": bytes(signature),
            "site_id": claim.site_id,  # for logs only: the verified claim names the site
            "status": claim.status,
            "reason": reason[:500],
        }
    )


def claim_from_site_record(record: object) -> tuple[ReplyClaim, object]:
    """(claim, signature as sent) from a reply's SITE record; raises `SignatureError` if malformed."""
    if not isinstance(record, ConfigRecord) and not hasattr(record, "get"):
        raise SignatureError("the reply has no site record")
    text = record.get("claim")
    if not isinstance(text, str) or len(text) > MAX_CLAIM_JSON:
        raise SignatureError("the reply's site record carries no signed claim")
    try:
        values = json.loads(text)
    except (ValueError, RecursionError) as error:  # RecursionError: nested deeper than the recursion limit
        raise SignatureError(f"the reply's claim is not JSON ({type(error).__name__}: {error})") from None
    return ReplyClaim.from_dict(values), record.get("signature")


@dataclass(frozen=True)
class RoundCertificate:
    """Why a site may trust an aggregate: the round it closes, its hash, and the participants' signed claims.

    The coordinator sends it beside every AGGREGATE. A site checks each claim against the federation
    manifest, that enough distinct sites took part, and — once decrypted — that the aggregate's
    example count is the sum of the claimed counts (a single site's update posing as an aggregate fails).
    """

    server_round: int
    aggregate_sha256: str
    claims: tuple[tuple[ReplyClaim, bytes], ...]

    def to_record(self) -> ConfigRecord:
        signed = [{"claim": claim.to_dict(), "signature": signature.hex()} for claim, signature in self.claims]
        return ConfigRecord(
            {"round": self.server_round, "aggregate_sha256": self.aggregate_sha256, "claims": json.dumps(signed, sort_keys=True)}
        )

    @classmethod
    def from_record(cls, record: object) -> RoundCertificate:
        """Parse untrusted data; raises `SignatureError` on anything malformed."""
        try:
            server_round = record["round"]  # type: ignore[index]
            aggregate = record["aggregate_sha256"]  # type: ignore[index]
            signed = json.loads(record["claims"])  # type: ignore[index]
            if isinstance(server_round, bool) or not isinstance(server_round, int) or not isinstance(aggregate, str):
                raise TypeError("round must be an integer and aggregate_sha256 a string")
            claims = tuple(
                (ReplyClaim.from_dict(item["claim"]), bytes.fromhex(item["signature"])) for item in signed
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise SignatureError(f"malformed round certificate ({error!r:.200})") from None
        return cls(server_round=server_round, aggregate_sha256=aggregate, claims=claims)


def certified_record_name(index: int, *, prefix: str = CERTIFIED_PREFIX) -> str:
    return f"{prefix}{index:04d}"


def certified_records(records: Mapping[str, ArrayRecord], *, prefix: str = CERTIFIED_PREFIX) -> list[ArrayRecord]:
    """The certified updates among a message's unpacked payloads, in their order (what the certificate's claims sign)."""
    return [records[name] for name in sorted(name for name in records if name.startswith(prefix))]
