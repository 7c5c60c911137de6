"""Payload packing, the coordinator's sum, and the sites' average."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medtwin.core.model_vector import count_parameters, model_to_vector, vector_to_model
from medtwin.core.protocol import (
    average_from_sum,
    chunks_to_record,
    pack_plain_update,
    record_bytes,
    record_from_bytes,
    record_to_chunks,
    sum_plain_updates,
    unpack_plain,
)
from medtwin.server.aggregation import PlainAggregator, SiteUpdate
from medtwin.server.loop import pooled_metrics, site_error_reason


def test_sum_of_packed_updates_gives_the_weighted_average() -> None:
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=7) for _ in range(3)]
    counts = [10, 30, 60]
    records = [pack_plain_update(w, num_examples=n) for w, n in zip(weights, counts)]
    average, total = average_from_sum(unpack_plain(sum_plain_updates(records)))
    expected = sum(w * n for w, n in zip(weights, counts)) / sum(counts)
    assert total == 100
    np.testing.assert_allclose(average, expected, rtol=1e-12)


def test_shape_mismatch_is_rejected_by_the_aggregator() -> None:
    aggregator = PlainAggregator()
    good = SiteUpdate("a", 1, 1, pack_plain_update(np.zeros(4), num_examples=1))
    bad = SiteUpdate("b", 2, 1, pack_plain_update(np.zeros(5), num_examples=1))
    assert aggregator.check(good, run_id="r") is None
    assert aggregator.check(bad, run_id="r")[0] == "shape_mismatch"


def test_payload_bytes_round_trip() -> None:
    record = pack_plain_update(np.arange(5.0), num_examples=3)
    assert np.array_equal(unpack_plain(record_from_bytes(record_bytes(record))), unpack_plain(record))
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


def test_site_error_reason_keeps_the_message_only() -> None:
    wrapped = "<class 'RayTaskError'>:<'ray::run()\\nException ClientAppException occurred. Message: budget spent'>"
    assert site_error_reason(wrapped) == "budget spent"
