"""The `crypto=plain` payload: a site's float32 model and exact count up, a float64 sum down.

A site's update carries its weights w_i as float32 — every shipped task's model is float32, so they
travel bit for bit as trained — and its example count n_i as an unsigned 64-bit integer, exact at any
size. Summing (the coordinator, and every site checking an aggregate: the same function, so the same
bits) multiplies each update by its count in float64 and keeps one float64 running total, Σ n_i·w_i,
beside the integer Σ n_i. A product n_i·w_i is exact in float64 while n_i < 2^29, so a sum's only
rounding is float64 addition. Sites divide the sum by its count to get the average.

A record holds one Flower `Array`, named `payload`: a Flower message carries one array record,
array and chunk object per payload, whatever the model's size. Its fields:

    dtype  "float32" (an update) | "float64" (a sum)       the weights' type
    shape  (num_weights,)
    stype  "medtwin.plain.update" | "medtwin.plain.sum"    which of the two, and this layout
    data   the count, 8 bytes little-endian unsigned, then the weights, little-endian

Only `numpy.frombuffer` reads it (no `np.load`). A float32 update costs 4 bytes per weight + 8;
`Array(ndarray)` would add np.save's 128-byte header.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from .errors import MedtwinError

__all__ = [
    "PLAIN_PAYLOAD",
    "PLAIN_SUM_STYPE",
    "PLAIN_UPDATE_STYPE",
    "PlainPayload",
    "PlainPayloadError",
    "average_from_sum",
    "pack_plain_update",
    "read_plain_sum",
    "read_plain_update",
    "sum_plain_updates",
]

PLAIN_PAYLOAD = "payload"  # the one array of a plain record
PLAIN_UPDATE_STYPE = "medtwin.plain.update"
PLAIN_SUM_STYPE = "medtwin.plain.sum"

_COUNT = np.dtype("<u8")
_UPDATE_WEIGHTS = np.dtype("<f4")
_SUM_WEIGHTS = np.dtype("<f8")
_LAYOUTS = {PLAIN_UPDATE_STYPE: _UPDATE_WEIGHTS, PLAIN_SUM_STYPE: _SUM_WEIGHTS}
_MAX_COUNT = 2**64 - 1


class PlainPayloadError(MedtwinError, ValueError):
    """A plain record that is not a well-formed update or sum; the message says which field and value."""


@dataclass(frozen=True)
class PlainPayload:
    weights: np.ndarray  # an update: the site's weights (float32); a sum: Σ n_i·w_i (float64)
    num_examples: int  # an update: n_i; a sum: Σ n_i


def pack_plain_update(weights: np.ndarray, *, num_examples: int) -> ArrayRecord:
    """A site's update: its weights as float32 (exact for a float32 model) and its count as an integer."""
    return _pack(np.asarray(weights).reshape(-1), num_examples, stype=PLAIN_UPDATE_STYPE)


def read_plain_update(record: ArrayRecord) -> PlainPayload:
    """The update in `record`; raises `PlainPayloadError` unless it is one, with finite weights and a count ≥ 1."""
    return _read(record, stype=PLAIN_UPDATE_STYPE)


def sum_plain_updates(records: Sequence[ArrayRecord]) -> ArrayRecord:
    """Σ n_i·w_i in one float64 running total (memory flat in the number of sites) and Σ n_i exactly.

    Raises `PlainPayloadError` if a record is not an update or the updates disagree on their size.
    """
    if not records:
        raise PlainPayloadError("there are no updates to sum")
    first = read_plain_update(records[0])
    total = np.zeros(first.weights.size, dtype=np.float64)
    product = np.empty_like(total)
    count = 0
    for index, record in enumerate(records):
        update = first if index == 0 else read_plain_update(record)
        if update.weights.size != total.size:
            raise PlainPayloadError(f"update {index} holds {update.weights.size} weights, update 0 holds {total.size}")
        np.multiply(update.weights, float(update.num_examples), out=product, dtype=np.float64)
        total += product
        count += update.num_examples
    return _pack(total, count, stype=PLAIN_SUM_STYPE)


def read_plain_sum(record: ArrayRecord) -> PlainPayload:
    """The sum in `record`; raises `PlainPayloadError` unless it is one, with finite weights and a count ≥ 1."""
    return _read(record, stype=PLAIN_SUM_STYPE)


def average_from_sum(record: ArrayRecord) -> tuple[np.ndarray, float]:
    """Sites' view of a sum: (average weights, float64; total examples)."""
    summed = read_plain_sum(record)
    return summed.weights / summed.num_examples, float(summed.num_examples)


def _pack(weights: np.ndarray, num_examples: int, *, stype: str) -> ArrayRecord:
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer):
        raise PlainPayloadError(f"num_examples must be an integer, got {num_examples!r:.40}")
    if not 0 <= num_examples <= _MAX_COUNT:
        raise PlainPayloadError(f"num_examples {num_examples} does not fit the payload's unsigned 64-bit count")
    values = weights.astype(_LAYOUTS[stype], copy=False)
    data = np.array([num_examples], dtype=_COUNT).tobytes() + values.tobytes()
    array = Array(dtype=values.dtype.name, shape=(int(values.size),), stype=stype, data=data)
    return ArrayRecord({PLAIN_PAYLOAD: array})


def _read(record: ArrayRecord, *, stype: str) -> PlainPayload:
    kind = "update" if stype == PLAIN_UPDATE_STYPE else "sum"
    names = sorted(record)
    if names != [PLAIN_PAYLOAD]:
        raise PlainPayloadError(f"a plain {kind} holds only the array {PLAIN_PAYLOAD!r}, this one {names[:4]!r:.120}")
    array = record[PLAIN_PAYLOAD]
    layout = _LAYOUTS[stype]
    if array.stype != stype:
        raise PlainPayloadError(f"the {kind}'s array has stype {array.stype!r:.60}, expected {stype!r}")
    if array.dtype != layout.name:
        raise PlainPayloadError(f"the {kind}'s array has dtype {array.dtype!r:.40}, expected {layout.name!r}")
    shape = tuple(array.shape)
    if len(shape) != 1 or shape[0] < 1:
        raise PlainPayloadError(f"the {kind}'s array has shape {shape!r:.60}, expected (num_weights,) with num_weights >= 1")
    data = array.data
    expected_bytes = _COUNT.itemsize + shape[0] * layout.itemsize
    if not isinstance(data, bytes) or len(data) != expected_bytes:
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise PlainPayloadError(
            f"the {kind}'s array holds {size} bytes, its layout {expected_bytes} (an 8-byte count + {shape[0]} {layout.name})"
        )
    count = int(np.frombuffer(data, dtype=_COUNT, count=1)[0])
    weights = np.frombuffer(data, dtype=layout, offset=_COUNT.itemsize)  # read-only, no copy
    if count < 1:
        raise PlainPayloadError(f"the {kind} counts {count} examples; it must count at least 1")
    if not np.all(np.isfinite(weights)):
        raise PlainPayloadError(f"the {kind} holds {int(np.sum(~np.isfinite(weights)))} NaN/inf weight(s)")
    return PlainPayload(weights=weights, num_examples=count)
