"""Payload packing, the coordinator's sum, and the sites' average."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from torch import nn

from medtwin.core.artifacts import ArtifactStore
from medtwin.core.identity import ReplyClaim
from medtwin.core.model_vector import count_parameters, model_to_vector, vector_to_model
from medtwin.core.plain_payload import (
    PLAIN_PAYLOAD,
    PLAIN_SUM_STYPE,
    PLAIN_UPDATE_STYPE,
    average_from_sum,
    pack_plain_update,
    read_plain_update,
    sum_plain_updates,
)
from medtwin.core.protocol import (
    AGGREGATE,
    CERTIFICATE,
    INSTRUCTION,
    PAYLOADS_MAGIC,
    PAYLOADS_STYPE,
    RECORD_MAGIC,
    ROUND_INPUTS,
    MalformedPayloads,
    certified_record_name,
    certified_records,
    chunks_to_record,
    instruction,
    metrics_sha256,
    pack_payloads,
    payload_sha256,
    record_bytes,
    record_from_bytes,
    record_to_chunks,
    unpack_payloads,
)
from medtwin.server.aggregation import PlainAggregator, SiteUpdate
from medtwin.server.loop import pooled_metrics, site_error_reason


def test_sum_of_packed_updates_gives_the_weighted_average() -> None:
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=7) for _ in range(3)]
    counts = [10, 30, 60]
    records = [pack_plain_update(w, num_examples=n) for w, n in zip(weights, counts)]
    average, total = average_from_sum(sum_plain_updates(records))
    expected = sum(w.astype(np.float32).astype(np.float64) * n for w, n in zip(weights, counts)) / sum(counts)
    assert total == 100
    np.testing.assert_allclose(average, expected, rtol=1e-12)


def _plain_update(site_id: str, record: ArrayRecord, *, num_examples: int = 1) -> SiteUpdate:
    claim = ReplyClaim(
        kind="update", run_id="r", server_round=1, site_id=site_id, payload_sha256=payload_sha256(record),
        num_examples=num_examples, status="trained",
    )
    return SiteUpdate(node_id=1, record=record, claim=claim, signature=b"\x00" * 64)


def test_shape_mismatch_is_rejected_by_the_aggregator() -> None:
    aggregator = PlainAggregator()
    good = _plain_update("a", pack_plain_update(np.zeros(4), num_examples=1))
    bad = _plain_update("b", pack_plain_update(np.zeros(5), num_examples=1))
    assert aggregator.check(good) is None
    assert aggregator.check(bad) is None  # nothing is pinned by a check...
    aggregator.accept(good)  # ...only by accepting an update
    assert aggregator.check(bad)[0] == "shape_mismatch"


def _raw_update(
    weights: object, count: int = 3, *, dtype: str = "<f4", stype: str = PLAIN_UPDATE_STYPE, shape: tuple | None = None, tail: bytes = b""
) -> ArrayRecord:
    """A plain record laid out by hand: 8-byte count, then `weights` as `dtype` (fields overridable)."""
    values = np.asarray(weights, dtype=dtype)
    data = np.array([count], dtype="<u8").tobytes() + values.tobytes() + tail
    array = Array(dtype=values.dtype.name, shape=shape if shape is not None else (values.size,), stype=stype, data=data)
    return ArrayRecord({PLAIN_PAYLOAD: array})


@pytest.mark.parametrize(
    "record",
    [
        ArrayRecord({PLAIN_PAYLOAD: Array(np.array([1.0, 2.0, 3.0]))}),  # earlier versions' float64 [n*w..., n]
        _raw_update([1.0, 2.0], dtype="<f8"),
        _raw_update([1, 2], dtype="<i4"),
        _raw_update([1.0, np.nan]),
        _raw_update([1.0, np.inf]),
        _raw_update([1.0, 2.0], count=0),
        _raw_update([1.0, 2.0], count=4),
        _raw_update([1.0, 2.0], tail=b"\x00"),
        _raw_update([1.0, 2.0, 3.0, 4.0], shape=(2, 2)),
        _raw_update([]),
        _raw_update([1.0, 2.0], stype=PLAIN_SUM_STYPE, dtype="<f8"),
    ],
    ids=[
        "numpy-float64", "float64", "int32", "nan", "inf", "zero-count", "count-not-claimed", "trailing-byte",
        "matrix", "no-weights", "a-sum",
    ],
)
def test_plain_aggregator_refuses_malformed_payloads(record: ArrayRecord) -> None:
    update = _plain_update("a", record, num_examples=3)
    problem = PlainAggregator().check(update)
    assert problem is not None and problem[0] == "malformed_update", problem
    assert PlainAggregator().check(_plain_update("a", _raw_update([1.0, 2.0]), num_examples=3)) is None


def test_plain_aggregator_refuses_foreign_arrays() -> None:
    record = pack_plain_update(np.ones(2), num_examples=3)
    record["extra"] = Array(np.ones(2))
    assert PlainAggregator().check(_plain_update("a", record, num_examples=3))[0] == "malformed_update"


def test_metrics_digest_is_canonical_json() -> None:
    metrics = {"n": 10.0, "accuracy": 0.75}
    expected = hashlib.sha256(b'{"accuracy":0.75,"n":10.0}').hexdigest()
    assert metrics_sha256(metrics) == expected == metrics_sha256(dict(reversed(metrics.items())))
    assert metrics_sha256({**metrics, "n": 11.0}) != expected


def test_payload_digest_is_the_artifact_key(tmp_path) -> None:
    record = pack_plain_update(np.arange(4.0), num_examples=2)
    assert ArtifactStore(tmp_path).put(record_bytes(record), kind="update") == payload_sha256(record)


def test_payload_bytes_round_trip() -> None:
    record = pack_plain_update(np.arange(5.0), num_examples=3)
    restored = read_plain_update(record_from_bytes(record_bytes(record)))
    assert np.array_equal(restored.weights, read_plain_update(record).weights) and restored.num_examples == 3
    chunks = [b"\x00\x01ciphertext", b"second"]
    assert record_to_chunks(record_from_bytes(record_bytes(chunks_to_record(chunks)))) == chunks


def test_model_vector_round_trip() -> None:
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1))
    torch.manual_seed(1)
    target = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1))
    vector_to_model(target, model_to_vector(source))
    assert count_parameters(source) == 22
    for a, b in zip(source.parameters(), target.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="22 parameters"):
        vector_to_model(target, np.zeros(3))


def test_pooled_metrics_weight_by_test_rows() -> None:
    pooled = pooled_metrics({"a": {"accuracy": 1.0, "n": 30.0}, "b": {"accuracy": 0.0, "n": 10.0}})
    assert pooled == {"accuracy": 0.75, "n": 40.0}


def test_pooled_metrics_name_what_is_not_the_metric_on_the_union() -> None:
    """Row means pool exactly and keep their names; AUROC & co. are only a weighted mean of site values."""
    pooled = pooled_metrics(
        {
            "a": {"accuracy": 1.0, "brier": 0.1, "auroc": 0.9, "sensitivity": 1.0, "n": 30.0},
            "b": {"accuracy": 0.0, "brier": 0.5, "n": 10.0},  # AUROC undefined on b's split: not released
        }
    )
    assert pooled == {
        "accuracy": 0.75,
        "brier": pytest.approx(0.2),
        "row_weighted_site_mean_auroc": 0.9,  # over the sites that released it, by their rows
        "row_weighted_site_mean_sensitivity": 1.0,
        "n": 40.0,
    }
    assert "auroc" not in pooled


def test_pooled_regression_metrics_rmse_is_the_root_of_the_pooled_mse() -> None:
    pooled = pooled_metrics(
        {"a": {"mse": 4.0, "rmse": 2.0, "mae": 1.0, "r2": 0.5, "n": 10.0}, "b": {"mse": 1.0, "rmse": 1.0, "mae": 2.0, "r2": 0.1, "n": 30.0}}
    )
    assert pooled["mse"] == pytest.approx(1.75) and pooled["rmse"] == pytest.approx(1.75**0.5)
    assert pooled["mae"] == pytest.approx(1.75) and pooled["row_weighted_site_mean_r2"] == pytest.approx(0.2)
    assert "r2" not in pooled


def test_site_error_reason_keeps_the_message_only() -> None:
    wrapped = "<class 'RayTaskError'>:<'ray::run()\\nException ClientAppException occurred. Message: budget spent'>"
    assert site_error_reason(wrapped) == "budget spent"


def _phase_content(num_sites: int) -> RecordDict:
    """A phase's instruction as the round loop builds it: the aggregate, its certificate and the certified updates."""
    updates = [chunks_to_record([bytes([index]) * 900, bytes([index]) * 300]) for index in range(num_sites)]
    payloads = {AGGREGATE: chunks_to_record([b"sum" * 400]), **{certified_record_name(index): update for index, update in enumerate(updates)}}
    return RecordDict(
        {
            INSTRUCTION: instruction(run_id="r", server_round=2, phase="train"),
            ROUND_INPUTS: pack_payloads(payloads),
            CERTIFICATE: ConfigRecord({"round": 1, "aggregate_sha256": "0" * 64, "claims": "[]"}),
        }
    )


def test_round_inputs_round_trip_with_the_same_digests() -> None:
    updates = [chunks_to_record([b"a" * 10, b"b" * 20]), pack_plain_update(np.arange(5, dtype=np.float32), num_examples=3)]
    aggregate = chunks_to_record([b"sum"])
    content = RecordDict({ROUND_INPUTS: pack_payloads({AGGREGATE: aggregate, certified_record_name(1): updates[1], certified_record_name(0): updates[0]})})
    unpacked = unpack_payloads(content, ROUND_INPUTS)
    assert payload_sha256(unpacked[AGGREGATE]) == payload_sha256(aggregate)
    assert [payload_sha256(record) for record in certified_records(unpacked)] == [payload_sha256(record) for record in updates]
    assert unpack_payloads(RecordDict({}), ROUND_INPUTS) == {}  # round 1 carries none


def test_a_phase_message_is_a_few_flower_objects_whatever_the_number_of_sites() -> None:
    """Every Flower object is one pull SuperLink -> SuperNode and one SuperNode -> ClientApp: the shared
    payloads travel as one array (3 objects), not 3 objects per record."""
    counts = {num_sites: len(get_all_nested_objects(_phase_content(num_sites))) for num_sites in (2, 4, 12)}
    assert counts == {2: 6, 4: 6, 12: 6}  # RecordDict, 2 ConfigRecords, ArrayRecord, Array, ArrayChunk (+ the Message)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"medtwin/payloads/v0\x00",
        PAYLOADS_MAGIC + (5).to_bytes(8, "big") + b"ab",  # a field longer than what is left
        PAYLOADS_MAGIC + b"\x00\x00",  # ends inside a length field
        PAYLOADS_MAGIC + (1).to_bytes(8, "big") + b"x",  # a name without its record
        PAYLOADS_MAGIC + (1).to_bytes(8, "big") + b"x" + (3).to_bytes(8, "big") + b"bad",  # not a payload record
        PAYLOADS_MAGIC + (2).to_bytes(8, "big") + b"\xff\xfe" + (0).to_bytes(8, "big"),  # a name that is not UTF-8
        PAYLOADS_MAGIC + 2 * ((1).to_bytes(8, "big") + b"x" + (len(RECORD_MAGIC)).to_bytes(8, "big") + RECORD_MAGIC),  # a name twice
        PAYLOADS_MAGIC + (1).to_bytes(8, "big") + b"x" + (len(RECORD_MAGIC) + 9).to_bytes(8, "big") + RECORD_MAGIC + (1).to_bytes(8, "big") + b"n",
    ],
)
def test_malformed_round_inputs_get_a_clear_error(blob: bytes) -> None:
    record = ArrayRecord({"payloads": Array(dtype="bytes", shape=(len(blob),), stype=PAYLOADS_STYPE, data=blob)})
    with pytest.raises(MalformedPayloads, match=ROUND_INPUTS):
        unpack_payloads(RecordDict({ROUND_INPUTS: record}), ROUND_INPUTS)


def test_round_inputs_that_are_not_one_payloads_array_are_refused() -> None:
    packed = pack_payloads({AGGREGATE: chunks_to_record([b"x"])})
    for record in (chunks_to_record([b"x"]), ArrayRecord({**packed, "extra": packed["payloads"]})):
        with pytest.raises(MalformedPayloads, match="is not one"):
            unpack_payloads(RecordDict({ROUND_INPUTS: record}), ROUND_INPUTS)
