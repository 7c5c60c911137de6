"""The plain payload: float32 weights and an exact count up, a float64 sum down, and the site's own check of it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ArrayRecord
from torch import nn

from medtwin.client.aggregate_check import AggregateRefused, check_decoded_sum, verify_certificate
from medtwin.client.codec import PlainSiteCodec
from medtwin.core.identity import FederationManifest, ReplyClaim, SiteEntry, sign_claim
from medtwin.core.identity.keys import raw_public_bytes
from medtwin.core.model_vector import model_to_vector
from medtwin.core.plain_payload import (
    PLAIN_PAYLOAD,
    PLAIN_SUM_STYPE,
    PLAIN_UPDATE_STYPE,
    PlainPayloadError,
    pack_plain_update,
    read_plain_sum,
    read_plain_update,
    sum_plain_updates,
)
from medtwin.core.protocol import RoundCertificate, payload_sha256
from medtwin.experiments.bench_wire import flower_bytes
from medtwin.server.aggregation import PlainAggregator, SiteUpdate

RUN_ID = "run-plain"
SITES = ("alpha", "beta", "gamma")
KEYS = {site: Ed25519PrivateKey.generate() for site in SITES}


def test_an_update_travels_as_the_float32_model_and_an_integer_count() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 1))
    weights = model_to_vector(model)
    record = pack_plain_update(weights, num_examples=123)
    array = record[PLAIN_PAYLOAD]
    assert list(record) == [PLAIN_PAYLOAD]
    assert (array.dtype, tuple(array.shape), array.stype) == ("float32", (weights.size,), PLAIN_UPDATE_STYPE)
    assert len(array.data) == 8 + 4 * weights.size
    update = read_plain_update(record)
    parameters = torch.cat([tensor.detach().ravel() for tensor in model.state_dict().values()]).numpy()
    assert update.weights.dtype == np.float32 and np.array_equal(update.weights, parameters)  # bit for bit
    assert update.num_examples == 123


@pytest.mark.parametrize("count", [2**24 + 1, 2**40 + 3, 2**64 - 1])
def test_counts_stay_exact_where_a_float32_would_round(count: int) -> None:
    assert int(np.float32(count)) != count
    assert read_plain_update(pack_plain_update(np.ones(3), num_examples=count)).num_examples == count


def test_the_sum_counts_exactly_and_refuses_a_count_beyond_64_bits() -> None:
    counts = [2**24 + 1, 2**40 + 3, 7]
    summed = read_plain_sum(sum_plain_updates([pack_plain_update(np.ones(2), num_examples=count) for count in counts]))
    assert summed.num_examples == sum(counts)
    with pytest.raises(PlainPayloadError, match="64-bit"):
        sum_plain_updates([pack_plain_update(np.ones(2), num_examples=2**63)] * 2)
    for count in (-1, 2**64, 1.5, True):
        with pytest.raises(PlainPayloadError):
            pack_plain_update(np.ones(2), num_examples=count)


def test_the_coordinator_sums_many_sites_in_float64() -> None:
    rng = np.random.default_rng(0)
    sites, size = 256, 1_000
    weights = [rng.normal(0.0, 0.3, size).astype(np.float32) for _ in range(sites)]
    counts = [int(count) for count in rng.integers(1, 1_000_000, sites)]
    summed = sum_plain_updates([pack_plain_update(w, num_examples=n) for w, n in zip(weights, counts)])
    assert summed[PLAIN_PAYLOAD].dtype == "float64" and summed[PLAIN_PAYLOAD].stype == PLAIN_SUM_STYPE
    result = read_plain_sum(summed)
    expected = np.zeros(size)
    for w, n in zip(weights, counts):
        expected += w.astype(np.float64) * n  # numpy's float64 sum of the float32 updates, in site order
    assert np.array_equal(result.weights, expected) and result.num_examples == sum(counts)
    exact = np.array([math.fsum(float(w[index]) * n for w, n in zip(weights, counts)) for index in range(size)])
    magnitude = sum(np.abs(w.astype(np.float64)) * n for w, n in zip(weights, counts))
    assert np.max(np.abs(result.weights - exact) / magnitude) < 1e-14  # float32 running sums would be ~1e-6 off


def test_updates_of_different_sizes_or_a_sum_do_not_add_up() -> None:
    with pytest.raises(PlainPayloadError, match="update 1 holds 3 weights"):
        sum_plain_updates([pack_plain_update(np.ones(2), num_examples=1), pack_plain_update(np.ones(3), num_examples=1)])
    a_sum = sum_plain_updates([pack_plain_update(np.ones(2), num_examples=1)])
    with pytest.raises(PlainPayloadError, match="stype"):
        sum_plain_updates([a_sum])
    with pytest.raises(PlainPayloadError):
        sum_plain_updates([])


def test_a_10k_parameter_update_costs_at_most_105_percent_of_float32_as_flower_ships_it() -> None:
    size = 10_000
    record = pack_plain_update(np.random.default_rng(1).normal(size=size), num_examples=500)
    assert flower_bytes(record) / (4 * size) <= 1.05


# --- the site's own check of an aggregate ------------------------------------------------------------------


def _manifest() -> FederationManifest:
    entries = tuple(
        SiteEntry(
            site_id=site,
            signing_public_key=raw_public_bytes(KEYS[site].public_key()).hex(),
            key_agreement_public_key=raw_public_bytes(X25519PrivateKey.generate().public_key()).hex(),
        )
        for site in SITES
    )
    return FederationManifest(
        federation_name="plain-test", created_utc="2025-01-01T00:00:00Z", ca_certificate_pem="",
        coordinator_host="localhost", coordinator_tls_fingerprint="", sites=entries,
    )  # fmt: skip


def _signed_update(site: str, record: ArrayRecord, *, num_examples: int) -> SiteUpdate:
    claim = ReplyClaim(
        kind="update", run_id=RUN_ID, server_round=1, site_id=site, payload_sha256=payload_sha256(record),
        num_examples=num_examples, status="trained",
    )  # fmt: skip
    return SiteUpdate(node_id=SITES.index(site) + 1, record=record, claim=claim, signature=sign_claim(KEYS[site], claim))


def _round(updates: list[SiteUpdate], *, aggregate: ArrayRecord | None = None) -> dict:
    """What a coordinator sends a site: the aggregate, its certificate and the certified updates."""
    summed = PlainAggregator().aggregate(updates)
    certificate = RoundCertificate(
        server_round=1, aggregate_sha256=payload_sha256(summed), claims=tuple((u.claim, u.signature) for u in updates)
    )
    return {"aggregate": aggregate or summed, "certificate": certificate.to_record(), "certified": [u.record for u in updates]}


def _site_decodes(sent: dict) -> tuple[np.ndarray, float, str]:
    """The site's path (client/app.py current_model): verify, sum the certified updates itself, check the count."""
    verified = verify_certificate(
        sent["certificate"], sent["aggregate"], sent["certified"], manifest=_manifest(), run_id=RUN_ID, server_round=1,
        min_participants=2,
    )  # fmt: skip
    codec = PlainSiteCodec()
    own_sum = codec.sum(verified.updates)
    average, total = codec.average(own_sum)
    check_decoded_sum(verified, average, total, error_bound=codec.count_error_bound())
    return average, total, payload_sha256(own_sum)


def _honest_updates() -> list[SiteUpdate]:
    rng = np.random.default_rng(2)
    counts = {"alpha": 40, "beta": 2**24 + 1, "gamma": 30}
    return [
        _signed_update(site, pack_plain_update(rng.normal(size=50), num_examples=counts[site]), num_examples=counts[site])
        for site in SITES
    ]


def test_a_site_accepts_the_honest_aggregate_and_its_own_sum_is_the_coordinators() -> None:
    updates = _honest_updates()
    sent = _round(updates)
    average, total, own_digest = _site_decodes(sent)
    assert own_digest == payload_sha256(sent["aggregate"])  # the same function, the same order: the same bits
    payloads = [read_plain_update(update.record) for update in updates]
    expected = sum(p.weights.astype(np.float64) * p.num_examples for p in payloads) / sum(p.num_examples for p in payloads)
    assert total == 70 + 2**24 + 1
    np.testing.assert_allclose(average, expected, rtol=1e-14, atol=0)


def test_a_site_refuses_a_tampered_round() -> None:
    updates = _honest_updates()
    nudged = read_plain_update(updates[1].record).weights.copy()
    nudged[7] = np.nextafter(nudged[7], np.float32(np.inf))  # one float32 ulp
    tampered_update = pack_plain_update(nudged, num_examples=updates[1].num_examples)
    partial = PlainAggregator().aggregate(updates[:2])
    honest = _round(updates)
    refused = {
        "a certified update one ulp off": honest | {"certified": [updates[0].record, tampered_update, updates[2].record]},
        "an aggregate other than certified": _round(updates, aggregate=partial),
    }
    for name, sent in refused.items():
        try:
            _site_decodes(sent)
        except AggregateRefused:
            continue
        pytest.fail(f"the site accepted {name}")
    # a site that signs one count and puts another in its payload: every honest site refuses the round
    lying = _signed_update("gamma", pack_plain_update(np.ones(50), num_examples=3_000), num_examples=30)
    with pytest.raises(AggregateRefused, match="claim"):
        _site_decodes(_round([updates[0], updates[1], lying]))
