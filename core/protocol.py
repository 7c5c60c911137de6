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
