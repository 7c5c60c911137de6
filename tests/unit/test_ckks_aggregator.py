"""The coordinator's CKKS aggregator: adds what it cannot read, and refuses forged, replayed or foreign updates.

Real TenSEAL ciphertexts and real federation kits (provisioned in tmp): the model (3000 weights)
is larger than one N = 2048 ciphertext (1024 slots), so every update spans several chunks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, Metadata, RecordDict

from medtwin.client.codec import CkksSiteCodec
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.he import (
    CkksParameters,
    HeContextError,
    choose_ckks_parameters,
    decrypt_sum,
    update_digest,
)
from medtwin.core.he.codec import CHUNK_HEADER
from medtwin.core.identity import (
    install_he_secret,
    load_site_he_context,
    load_site_kit,
    provision_federation,
    sign_update,
    steward_generate_he_keys,
)
from medtwin.core.protocol import SITE, UPDATE, chunks_to_record, record_to_chunks
from medtwin.server.aggregation import CkksAggregator, SiteUpdate
from medtwin.server.loop import RoundLoop

SITES = ("hosp0", "hosp1", "hosp2", "hosp3")
NUM_PARAMETERS = 3000  # + 1 count = 3001 packed values -> 3 ciphertexts of 1024 slots
COUNTS = {"hosp0": 310, "hosp1": 95, "hosp2": 520, "hosp3": 27}  # 952 examples in all
RUN_ID = "run-alpha"


@dataclass(frozen=True)
class Federation:
    name: str
    site_codecs: dict[str, CkksSiteCodec]
    public_context_path: Path
    secret_context_path: Path  # the steward's (a site's) file: must never reach the coordinator
    coordinator_kit: Path

    def aggregator(self) -> CkksAggregator:
        """A fresh coordinator-side aggregator built from public files only, as the ServerApp builds it."""
        return CkksAggregator.from_files(
            public_context_path=str(self.public_context_path), manifest_path=str(self.coordinator_kit)
        )


def _build_federation(root: Path, name: str, params: CkksParameters) -> Federation:
    provisioned = provision_federation(root, federation_name=name, site_ids=list(SITES))
    distribution = steward_generate_he_keys(provisioned.site_kits["hosp0"], params, outbox_dir=root / "steward-outbox")
    for site_id, envelope in distribution.envelope_paths.items():
        install_he_secret(provisioned.site_kits[site_id], envelope)
    codecs = {}
    for site_id in SITES:
        kit = load_site_kit(provisioned.site_kits[site_id])
        codecs[site_id] = CkksSiteCodec(kit, load_site_he_context(kit))
    return Federation(
        name=name,
        site_codecs=codecs,
        public_context_path=distribution.public_context_path,
        secret_context_path=distribution.secret_context_path,
        coordinator_kit=provisioned.coordinator_kit,
    )


@pytest.fixture(scope="module")
def params() -> CkksParameters:
    chosen = choose_ckks_parameters(
        num_parameters=NUM_PARAMETERS,
        num_sites=len(SITES),
        max_relative_error=1e-5,
        max_abs_weight_bound=1.0,
        max_total_examples=1000,
        poly_modulus_degree=2048,
    )
    assert chosen.slots == 1024 and chosen.num_ciphertexts == 3
    return chosen


@pytest.fixture(scope="module")
def alpha(tmp_path_factory: pytest.TempPathFactory, params: CkksParameters) -> Federation:
    return _build_federation(tmp_path_factory.mktemp("alpha") / "fed", "alpha", params)


@pytest.fixture(scope="module")
def beta(tmp_path_factory: pytest.TempPathFactory, params: CkksParameters) -> Federation:
    """Another federation with the same site names and CKKS parameters, but its own keys."""
    return _build_federation(tmp_path_factory.mktemp("beta") / "fed", "beta", params)


def _weights(site_id: str, server_round: int) -> np.ndarray:
    seed = [SITES.index(site_id), server_round]
    return np.random.default_rng(seed).uniform(-1.0, 1.0, NUM_PARAMETERS)


def _pack(codec: CkksSiteCodec, *, site_id: str, server_round: int, run_id: str = RUN_ID, node_id: int = 0) -> SiteUpdate:
    record, proof = codec.pack(
        _weights(site_id, server_round), num_examples=COUNTS[site_id], run_id=run_id, server_round=server_round
    )
    return SiteUpdate(
        site_id=site_id,
        node_id=node_id or SITES.index(site_id) + 1,
        server_round=server_round,
        record=record,
        signature=proof["signature"],
    )


def _problem(aggregator: CkksAggregator, update: SiteUpdate) -> tuple[str, str]:
    """The (code, reason) of a rejection; fails the test if the update was accepted."""
    problem = aggregator.check(update, run_id=RUN_ID)
    assert problem is not None, f"{update.site_id}'s bad update (round {update.server_round}) was accepted"
    code, reason = problem
    return code, reason


def _plain_average(site_ids: list[str], server_round: int) -> np.ndarray:
    total = sum(COUNTS[site] for site in site_ids)
    return sum(_weights(site, server_round) * COUNTS[site] for site in site_ids) / total


def _assert_decrypts_to_honest_average(federation: Federation, aggregate, honest: list[str], server_round: int) -> None:
    codec = federation.site_codecs["hosp3"]  # any key-holding site
    average, total = codec.average(aggregate)
    expected = _plain_average(honest, server_round)
    assert total == sum(COUNTS[site] for site in honest)
    error = float(np.max(np.abs(average - expected)))
    assert error <= codec.error_bound(total_examples=total)
    assert error <= 1e-5 * float(np.max(np.abs(expected)))


# --- the coordinator holds no key -------------------------------------------------------------------


def test_coordinator_context_is_public_and_cannot_decrypt(alpha: Federation) -> None:
    aggregator = alpha.aggregator()
    context = aggregator.public_context
    assert not context.is_private
    assert not context.tenseal_context.is_private() and context.tenseal_context.is_public()
    assert not context.tenseal_context.has_galois_keys() and not context.tenseal_context.has_relin_keys()
    assert context.key_id == alpha.site_codecs["hosp1"].context.key_id  # same key set, only without the key

    updates = [_pack(alpha.site_codecs[site], site_id=site, server_round=1) for site in SITES]
    assert all(aggregator.check(update, run_id=RUN_ID) is None for update in updates)
    aggregate = aggregator.aggregate(updates)
    summed = record_to_chunks(aggregate)
    assert len(summed) == 3

    with pytest.raises(HeContextError, match="cannot decrypt"):
        decrypt_sum(context, summed)
    with pytest.raises(HeContextError, match="cannot decrypt"):
        CkksSiteCodec(alpha.site_codecs["hosp1"].kit, context).average(aggregate)
    vector = ts.ckks_vector_from(context.tenseal_context, summed[0][CHUNK_HEADER.size :])
    with pytest.raises(ValueError, match="secret_key"):
        vector.decrypt()  # TenSEAL itself: no secret key in this context
    # ...while every site can
    _assert_decrypts_to_honest_average(alpha, aggregate, list(SITES), server_round=1)


def test_coordinator_refuses_a_secret_context_file(alpha: Federation) -> None:
    with pytest.raises(HeContextError, match="expected a public HE context, got a secret one"):
        CkksAggregator.from_files(
            public_context_path=str(alpha.secret_context_path), manifest_path=str(alpha.coordinator_kit)
        )
    secret_tail = alpha.secret_context_path.read_bytes()[-64:]
    assert secret_tail not in alpha.public_context_path.read_bytes()


# --- encrypted FedAvg == plaintext FedAvg -------------------------------------------------------------


@pytest.mark.parametrize("honest", [list(SITES), ["hosp0", "hosp2"], ["hosp3"]], ids=["all", "two", "smallest-alone"])
def test_encrypted_fedavg_equals_plaintext_weighted_average(alpha: Federation, honest: list[str]) -> None:
    aggregator = alpha.aggregator()
    updates = [_pack(alpha.site_codecs[site], site_id=site, server_round=1) for site in honest]
    assert [aggregator.check(update, run_id=RUN_ID) for update in updates] == [None] * len(honest)
    aggregate = aggregator.aggregate(updates)
    codec = alpha.site_codecs["hosp0"]
    average, total = codec.average(aggregate)
    expected = _plain_average(honest, 1)
    error = float(np.max(np.abs(average - expected)))
    assert total == sum(COUNTS[site] for site in honest)
    assert error <= codec.error_bound(total_examples=total)
    if total >= 500:  # the relative target holds near full scale (max_total_examples = 1000)
        assert error <= 1e-5 * float(np.max(np.abs(expected)))
    assert error > 0.0  # it really went through CKKS (approximate arithmetic), not a plaintext shortcut


# --- rejections: each bad update is refused with a reason, the honest round still closes ---------------


def _flip_a_ciphertext_byte(update: SiteUpdate) -> SiteUpdate:
    chunks = record_to_chunks(update.record)
    body = bytearray(chunks[1])
    body[CHUNK_HEADER.size + len(body) // 2] ^= 0x01
    chunks[1] = bytes(body)
    return replace(update, record=chunks_to_record(chunks))


def _tampered(alpha: Federation, beta: Federation) -> SiteUpdate:
    return _flip_a_ciphertext_byte(_pack(alpha.site_codecs["hosp2"], site_id="hosp2", server_round=1))


def _signed_by_another_site(alpha: Federation, beta: Federation) -> SiteUpdate:
    update = _pack(alpha.site_codecs["hosp2"], site_id="hosp2", server_round=1)
    forged = sign_update(
        alpha.site_codecs["hosp3"].kit.signing_key,
        run_id=RUN_ID,
        server_round=1,
        site_id="hosp2",
        ciphertext_digest=update_digest(record_to_chunks(update.record)),
    )
    return replace(update, signature=forged)


def _random_signature(alpha: Federation, beta: Federation) -> SiteUpdate:
    return replace(_pack(alpha.site_codecs["hosp2"], site_id="hosp2", server_round=1), signature=os.urandom(64))


def _no_signature(alpha: Federation, beta: Federation) -> SiteUpdate:
    return replace(_pack(alpha.site_codecs["hosp2"], site_id="hosp2", server_round=1), signature=b"")


def _signed_for_another_run(alpha: Federation, beta: Federation) -> SiteUpdate:
    """hosp2's genuine update from another run of the same federation (the coordinator checks RUN_ID)."""
    return _pack(alpha.site_codecs["hosp2"], site_id="hosp2", server_round=1, run_id="run-other")


def _unknown_site(alpha: Federation, beta: Federation) -> SiteUpdate:
    update = _pack(alpha.site_codecs["hosp2"], site_id="hosp2", server_round=1)
    intruder_key = Ed25519PrivateKey.generate()
    signature = sign_update(
        intruder_key,
        run_id=RUN_ID,
        server_round=1,
        site_id="mallory",
        ciphertext_digest=update_digest(record_to_chunks(update.record)),
    )
    return replace(update, site_id="mallory", node_id=99, signature=signature)


def _wrong_key_set(alpha: Federation, beta: Federation) -> SiteUpdate:
    """hosp2 signs correctly, but encrypted under the other federation's CKKS key."""
    confused = CkksSiteCodec(alpha.site_codecs["hosp2"].kit, beta.site_codecs["hosp2"].context)
    return _pack(confused, site_id="hosp2", server_round=1)


def _other_federation(alpha: Federation, beta: Federation) -> SiteUpdate:
    """An update from the other federation's hosp2 (its own signing key and CKKS key)."""
    return _pack(beta.site_codecs["hosp2"], site_id="hosp2", server_round=1)


def _signed_but_malformed(alpha: Federation, beta: Federation) -> SiteUpdate:
    """A correctly signed update missing its last ciphertext chunk."""
    kit = alpha.site_codecs["hosp2"].kit
    chunks = record_to_chunks(_pack(alpha.site_codecs["hosp2"], site_id="hosp2", server_round=1).record)[:-1]
    signature = sign_update(
        kit.signing_key, run_id=RUN_ID, server_round=1, site_id="hosp2", ciphertext_digest=update_digest(chunks)
    )
    return SiteUpdate(site_id="hosp2", node_id=3, server_round=1, record=chunks_to_record(chunks), signature=signature)


# (builder, key words the reason must contain); each bad update arrives BEFORE the sites' genuine ones,
# so the test also shows that a refused forgery does not lock the real site out of the round
FORGERIES: dict[str, tuple[Callable[[Federation, Federation], SiteUpdate], str, tuple[str, ...]]] = {
    "tampered-ciphertext-byte": (_tampered, "bad_signature", ("signature rejected", "hosp2", "tampered")),
    "signature-by-another-site": (_signed_by_another_site, "bad_signature", ("signature rejected", "hosp2")),
    "random-signature-bytes": (_random_signature, "bad_signature", ("signature rejected", "hosp2")),
    "empty-signature": (_no_signature, "bad_signature", ("signature rejected", "hosp2")),
    "signed-for-another-run": (_signed_for_another_run, "bad_signature", ("signature rejected", RUN_ID, "round 1")),
    "unknown-site": (_unknown_site, "unknown_site", ("unknown site", "mallory", "alpha")),
    "wrong-he-key-set": (_wrong_key_set, "ciphertext_mismatch", ("key set", "chunk 0")),
    "other-federation": (_other_federation, "bad_signature", ("signature rejected", "hosp2")),
    "signed-but-missing-a-chunk": (_signed_but_malformed, "ciphertext_mismatch", ("2 ciphertext chunks", "need 3")),
}


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_bad_update_is_rejected_and_round_closes_with_honest_average(
    alpha: Federation, beta: Federation, case: str
) -> None:
    build, expected_code, key_words = FORGERIES[case]
    aggregator = alpha.aggregator()
    code, reason = _problem(aggregator, build(alpha, beta))
    assert code == expected_code, f"{case}: code {code!r}, reason {reason!r}"
    for word in key_words:
        assert word in reason, f"{case}: {word!r} not in {reason!r}"

    honest = [_pack(alpha.site_codecs[site], site_id=site, server_round=1) for site in SITES]
    assert [aggregator.check(update, run_id=RUN_ID) for update in honest] == [None] * len(SITES)
    _assert_decrypts_to_honest_average(alpha, aggregator.aggregate(honest), list(SITES), server_round=1)


@pytest.mark.parametrize("second", ["same-update-again", "fresh-second-update"])
def test_second_update_from_a_site_in_one_round_is_rejected(alpha: Federation, second: str) -> None:
    aggregator = alpha.aggregator()
    honest = [_pack(alpha.site_codecs[site], site_id=site, server_round=1) for site in SITES]
    assert [aggregator.check(update, run_id=RUN_ID) for update in honest] == [None] * len(SITES)
    if second == "same-update-again":
        again, key_words = honest[1], ("replay", "hosp1", "round 1")
    else:  # properly signed, different ciphertext: still one vote per site per round
        again = _pack(alpha.site_codecs["hosp1"], site_id="hosp1", server_round=1)
        key_words = ("replay", "hosp1", "already has an accepted update", "round 1")
    code, reason = _problem(aggregator, again)
    assert code == "replay"
    for word in key_words:
        assert word in reason, f"{word!r} not in {reason!r}"
    _assert_decrypts_to_honest_average(alpha, aggregator.aggregate(honest), list(SITES), server_round=1)


def test_old_round_update_replayed_in_a_later_round_is_rejected(alpha: Federation) -> None:
    aggregator = alpha.aggregator()
    round_1 = [_pack(alpha.site_codecs[site], site_id=site, server_round=1) for site in SITES]
    assert [aggregator.check(update, run_id=RUN_ID) for update in round_1] == [None] * len(SITES)
    aggregator.aggregate(round_1)

    # round 2: hosp2's reply is its round-1 update (ciphertext + signature) presented as round 2
    replayed = replace(round_1[2], server_round=2)
    code, reason = _problem(aggregator, replayed)
    assert code == "replay" and "hosp2" in reason and "round 1" in reason
    # a coordinator restarted since round 1 has no memory of digests: the round-bound signature still refuses it
    code, reason = _problem(alpha.aggregator(), replayed)
    assert code == "bad_signature" and "signature rejected" in reason and "round 2" in reason

    honest_2 = [_pack(alpha.site_codecs[site], site_id=site, server_round=2) for site in ("hosp0", "hosp1", "hosp3")]
    assert [aggregator.check(update, run_id=RUN_ID) for update in honest_2] == [None] * 3
    _assert_decrypts_to_honest_average(alpha, aggregator.aggregate(honest_2), ["hosp0", "hosp1", "hosp3"], server_round=2)


# --- the same, through the coordinator's round loop -----------------------------------------------------


def _reply(update: SiteUpdate, *, node_id: int, site_id: str | None = None) -> Message:
    """A site's train reply as the Grid hands it to the loop (Flower's Message, metadata set as the SuperLink would)."""
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node_id}-{update.server_round}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"ins-{node_id}-{update.server_round}",
        group_id="",
        created_at=0.0,
        ttl=600.0,
        message_type="train",
    )
    content = RecordDict(
        {
            UPDATE: update.record,
            SITE: ConfigRecord({"site_id": site_id or update.site_id, "status": "trained", "signature": update.signature}),
        }
    )
    return Message(content=content, metadata=metadata)


def test_round_loop_rejects_bad_replies_and_closes_the_round_with_the_honest_sum(
    alpha: Federation, tmp_path: Path, default_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = replace(default_config, federation=replace(default_config.federation, min_sites=2))
    records: list[dict] = []
    loop = RoundLoop(
        grid=None,  # the Grid is reached only through `_send`, replaced below
        config=config,
        run_id=RUN_ID,
        aggregator=alpha.aggregator(),
        artifacts=ArtifactStore(tmp_path / "artifacts"),
        on_record=records.append,
    )
    nodes = {site: index + 1 for index, site in enumerate(SITES)}
    round_1 = {site: _pack(alpha.site_codecs[site], site_id=site, server_round=1) for site in SITES}
    honest_2 = {site: _pack(alpha.site_codecs[site], site_id=site, server_round=2) for site in ("hosp0", "hosp1")}
    intruder = _unknown_site(alpha, alpha)
    tampered_3 = _flip_a_ciphertext_byte(_pack(alpha.site_codecs["hosp3"], site_id="hosp3", server_round=2))
    replies = {
        1: [_reply(round_1[site], node_id=nodes[site]) for site in SITES],
        2: [
            _reply(honest_2["hosp0"], node_id=nodes["hosp0"]),
            _reply(round_1["hosp2"], node_id=nodes["hosp2"]),  # replays its round-1 reply
            _reply(tampered_3, node_id=nodes["hosp3"]),  # altered in transit
            _reply(intruder, node_id=99),
            _reply(honest_2["hosp1"], node_id=nodes["hosp1"]),
        ],
    }
    monkeypatch.setattr(loop, "_send", lambda node_ids, *, phase, server_round: replies[server_round])

    loop.train_round(1, list(nodes.values()))
    loop.train_round(2, [*nodes.values(), 99])

    first, second = records
    assert first["participants"] == list(SITES) and first["rejected"] == {}
    assert second["participants"] == ["hosp0", "hosp1"]
    rejected = second["rejected"]
    assert set(rejected) == {"hosp2", "hosp3", "mallory"}
    assert "replay" in rejected["hosp2"] and "round 1" in rejected["hosp2"]
    assert "signature rejected" in rejected["hosp3"]
    assert "unknown site" in rejected["mallory"]
    assert [(rejection.server_round, rejection.site_id, rejection.code) for rejection in loop.result.rejections] == [
        (2, "hosp2", "replay"), (2, "hosp3", "bad_signature"), (2, "mallory", "unknown_site"),
    ]
    assert loop.result.accepted_updates == 6
    assert ArtifactStore(tmp_path / "artifacts").exists(second["aggregate_sha256"])
    _assert_decrypts_to_honest_average(alpha, loop.result.aggregate, ["hosp0", "hosp1"], server_round=2)
