"""What travels in Flower messages between coordinator and sites: record names and the plain payload.

A site's update is the vector [n_i * w_i ..., n_i] (weights times its sample count, then the count).
The coordinator only ever sums updates; sites divide the sum by its last entry to get the average.
With `crypto=plain` the vector travels as one float64 array; encrypted schemes replace the payload
with ciphertext chunks but keep the same meaning.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

# record names inside a Message's RecordDict
INSTRUCTION = "medtwin.instruction"  # ConfigRecord: run_id, round, phase, ...
AGGREGATE = "medtwin.aggregate"  # ArrayRecord: summed payload of the previous round (absent in round 1)
UPDATE = "medtwin.update"  # ArrayRecord: a site's payload
SITE = "medtwin.site"  # ConfigRecord: site_id, status, reason
METRICS = "medtwin.metrics"  # MetricRecord: training or evaluation metrics

PLAIN_PAYLOAD = "payload"


def pack_plain_update(weights: np.ndarray, *, num_examples: int) -> ArrayRecord:
    payload = np.append(weights.astype(np.float64) * num_examples, float(num_examples))
    return ArrayRecord({PLAIN_PAYLOAD: Array(payload)})


def unpack_plain(record: ArrayRecord) -> np.ndarray:
    return record[PLAIN_PAYLOAD].numpy()


def sum_plain_updates(records: list[ArrayRecord]) -> ArrayRecord:
    """The coordinator's plaintext aggregation: an element-wise sum; shapes must agree."""
    vectors = [unpack_plain(record) for record in records]
    shapes = {vector.shape for vector in vectors}
    if len(shapes) != 1:
        raise ValueError(f"updates disagree on shape: {sorted(shapes)}")
    return ArrayRecord({PLAIN_PAYLOAD: Array(np.sum(vectors, axis=0))})


def average_from_sum(summed: np.ndarray) -> tuple[np.ndarray, float]:
    """Sites' view of an aggregate: (average weights, total examples)."""
    total_examples = float(summed[-1])
    if total_examples <= 0:
        raise ValueError(f"aggregate carries a non-positive example count {total_examples}")
    return summed[:-1] / total_examples, total_examples


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
