"""What travels in Flower messages between coordinator and sites: record names, claims, certificates.

A site's update contributes n_i * w_i (its weights times its sample count) and n_i to a sum; the
coordinator only ever sums updates, and sites divide a sum by its count to get the average. With
`crypto=plain` an update carries the site's float32 weights and integer count, and summing forms the
products in float64 (core/plain_payload.py); CKKS encrypts [n_i * w_i ..., n_i] as ciphertext chunks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from .identity.errors import SignatureError
from .identity.signing import ReplyClaim

# record names inside a Message's RecordDict
INSTRUCTION = "medtwin.instruction"  # ConfigRecord: run_id, round, phase, ...
AGGREGATE = "medtwin.aggregate"  # ArrayRecord: summed payload of the previous round (absent in round 1)
UPDATE = "medtwin.update"  # ArrayRecord: a site's payload
SITE = "medtwin.site"  # ConfigRecord: site_id, status, reason
METRICS = "medtwin.metrics"  # MetricRecord: training or evaluation metrics
SCORE_HISTOGRAM = "medtwin.score_histogram"  # MetricRecord: a binary site's per-class score histogram (core/score_histogram.py)
CERTIFICATE = "medtwin.certificate"  # ConfigRecord: the signed claims behind the AGGREGATE (see RoundCertificate)
CERTIFIED_PREFIX = "medtwin.certified."  # ArrayRecords: the certified updates themselves, so each site sums them
# task.normalization=federated: the statistics phase before round 1 (core/tasks/federated_statistics.py) is a
# "round 0" of updates with status "statistics"; its sum, certificate and certified updates ride with every later message
STATISTICS_ROUND = 0
STATISTICS_STATUS = "statistics"
STATISTICS_AGGREGATE = "medtwin.statistics.aggregate"  # ArrayRecord: the summed statistics
STATISTICS_CERTIFICATE = "medtwin.statistics.certificate"  # ConfigRecord: a RoundCertificate of round 0
STATISTICS_CERTIFIED_PREFIX = "medtwin.statistics.certified."  # ArrayRecords: the certified statistics updates


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


def record_from_bytes(data: bytes) -> ArrayRecord:
    """Inverse of `record_bytes` (for auditors and the simulation harness reading artifacts back)."""
    if not data.startswith(RECORD_MAGIC):
        raise ValueError("not a medtwin payload artifact (bad magic)")
    offset = len(RECORD_MAGIC)
    fields: list[bytes] = []
    while offset < len(data):
        length = int.from_bytes(data[offset : offset + 8], "big")
        fields.append(data[offset + 8 : offset + 8 + length])
        offset += 8 + length
    arrays = {}
    for index in range(0, len(fields), 5):
        name, dtype, shape, stype, blob = fields[index : index + 5]
        dims = tuple(int(part) for part in shape.decode().strip("(),").split(",") if part.strip())
        arrays[name.decode()] = Array(dtype=dtype.decode(), shape=dims, stype=stype.decode(), data=blob)
    return ArrayRecord(arrays)


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
    except ValueError as error:
        raise SignatureError(f"the reply's claim is not JSON ({error})") from None
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


def certified_records(content: RecordDict, *, prefix: str = CERTIFIED_PREFIX) -> list[ArrayRecord]:
    """The certified updates a message carries, in their order (what the certificate's claims sign)."""
    records = content.array_records  # Flower builds this view anew on every access: once, not once per update
    return [records[name] for name in sorted(name for name in records if name.startswith(prefix))]
