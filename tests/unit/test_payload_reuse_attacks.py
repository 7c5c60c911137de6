"""A hostile coordinator's packed payloads (core/protocol.py unpack_payloads / record_from_bytes): only the
bytes pack_payloads / record_bytes write are read, so one record has exactly one byte string."""

from __future__ import annotations

import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from medtwin.client.aggregate_check import AggregateRefused, shared_payloads
from medtwin.core.protocol import (
    AGGREGATE,
    PAYLOADS_MAGIC,
    PAYLOADS_STYPE,
    RECORD_MAGIC,
    ROUND_INPUTS,
    MalformedPayloads,
    certified_record_name,
    chunks_to_record,
    pack_payloads,
    record_bytes,
    record_from_bytes,
    unpack_payloads,
)


def _fields(*fields: bytes) -> bytes:
    return b"".join(len(field).to_bytes(8, "big") + field for field in fields)


def _record(*arrays: tuple[bytes, bytes, bytes, bytes, bytes]) -> bytes:
    return RECORD_MAGIC + b"".join(_fields(*array) for array in arrays)


def _inputs(blob: bytes) -> RecordDict:
    return RecordDict({ROUND_INPUTS: ArrayRecord({"payloads": Array(dtype="bytes", shape=(len(blob),), stype=PAYLOADS_STYPE, data=blob)})})


CANONICAL = _record((b"chunk-00000", b"bytes", b"(3,)", b"s", b"abc"))


def test_canonical_record_bytes_round_trip() -> None:
    assert record_bytes(record_from_bytes(CANONICAL)) == CANONICAL


@pytest.mark.parametrize(
    "blob",
    [
        _record((b"chunk-00000", b"bytes", b"3", b"s", b"abc")),  # shape without the tuple's parentheses
        _record((b"chunk-00000", b"bytes", b"1_0", b"s", b"abc")),  # int() reads "1_0" as 10
        _record((b"chunk-00000", b"bytes", b"( 3 ,)", b"s", b"abc")),
        _record((b"chunk-00000", b"bytes", b"((3,),)", b"s", b"abc")),
        _record((b"chunk-00000", b"bytes", b"", b"s", b"abc")),  # reads as ()
        _record((b"chunk-00000", b"bytes", "(\u0663,)".encode(), b"s", b"abc")),  # an Arabic-Indic 3
        # the same name twice: the first array silently dropped
        _record((b"chunk-00000", b"bytes", b"(3,)", b"s", b"xyz"), (b"chunk-00000", b"bytes", b"(3,)", b"s", b"abc")),
        # names out of order
        _record((b"chunk-00001", b"bytes", b"(1,)", b"s", b"b"), (b"chunk-00000", b"bytes", b"(1,)", b"s", b"a")),
    ],
)
def test_a_record_in_another_spelling_is_refused(blob: bytes) -> None:
    """Each of these parsed to a record whose record_bytes differ from the bytes sent: two byte strings, one
    record and one digest (record_from_bytes promises ValueError on anything record_bytes cannot have written)."""
    with pytest.raises(ValueError):
        record_from_bytes(blob)
    with pytest.raises(AggregateRefused):
        shared_payloads(_inputs(PAYLOADS_MAGIC + _fields(AGGREGATE.encode(), blob)), ROUND_INPUTS)


def test_packed_records_out_of_order_are_refused() -> None:
    """pack_payloads writes the records sorted by name: any other order is another byte string for the same records."""
    first, second = certified_record_name(0).encode(), certified_record_name(1).encode()
    swapped = PAYLOADS_MAGIC + _fields(second, CANONICAL, first, CANONICAL)
    with pytest.raises(MalformedPayloads, match="out of order"):
        unpack_payloads(_inputs(swapped), ROUND_INPUTS)
    in_order = PAYLOADS_MAGIC + _fields(first, CANONICAL, second, CANONICAL)
    assert list(unpack_payloads(_inputs(in_order), ROUND_INPUTS)) == [certified_record_name(0), certified_record_name(1)]


def test_what_pack_payloads_writes_is_the_only_spelling() -> None:
    records = {AGGREGATE: chunks_to_record([b"sum"]), certified_record_name(0): chunks_to_record([b"a", b"bc"])}
    packed = pack_payloads(records)
    unpacked = unpack_payloads(RecordDict({ROUND_INPUTS: packed}), ROUND_INPUTS)
    assert pack_payloads(unpacked)["payloads"].data == packed["payloads"].data
