"""Payload packing, the coordinator's sum, and the sites' average."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
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
    chunks_to_record,
    metrics_sha256,
    payload_sha256,
    record_bytes,
    record_from_bytes,
    record_to_chunks,
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
