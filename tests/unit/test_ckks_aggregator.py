"""The coordinator's CKKS path: it adds what it cannot read, and refuses forged, replayed or foreign updates.

Real SEAL ciphertexts (seeded, one real per plaintext coefficient) and real Ed25519 keys; the federation (key set,
manifest) is built here from `medtwin.core` primitives. The model (5000 weights) is larger than one
N = 2048 ciphertext (2048 coefficients = 2048 reals), so every update spans several chunks. Who sent an update is the `ReplyVerifier`'s question
(the same for every scheme); whether its ciphertexts fit the federation's public context is the
`CkksAggregator`'s.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import tenseal.sealapi as sealapi
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, RecordDict

from medtwin.core.artifacts import ArtifactStore
from medtwin.core.he import (
    CkksParameters,
    HeContext,
    HeContextError,
    average_error_bound,
    choose_ckks_parameters,
    create_secret_context,
    decrypt_average,
    decrypt_sum,
    encrypt_update,
    serialize_public_context,
    serialize_secret_context,
    sum_encrypted,
)
from medtwin.core.he.codec import CHUNK_HEADER
from medtwin.core.identity import FederationManifest, ReplyClaim, SiteEntry, sign_claim
from medtwin.core.identity.keys import raw_public_bytes
from medtwin.core.protocol import SITE, UPDATE, chunks_to_record, payload_sha256, record_to_chunks, site_reply_record
from medtwin.server.aggregation import CkksAggregator, SiteUpdate
from medtwin.server.loop import RoundLoop
from medtwin.server.verifier import ReplyRejected, ReplyVerifier

SITES = ("hosp0", "hosp1", "hosp2", "hosp3")
NUM_PARAMETERS = 5000  # + 1 count = 5001 packed values -> 3 ciphertexts of 2048 reals
COUNTS = {"hosp0": 310, "hosp1": 95, "hosp2": 520, "hosp3": 27}  # 952 examples in all
RUN_ID = "run-alpha"


@dataclass(frozen=True)
class Federation:
    name: str
    secret_context: HeContext  # what every site holds (made by the key steward, a site)
    public_context_path: Path
    secret_context_path: Path  # the steward's file: must never reach the coordinator
    signing_keys: dict[str, Ed25519PrivateKey]
    manifest: FederationManifest

    def aggregator(self) -> CkksAggregator:
        """A fresh coordinator-side aggregator built from the public file only, as the ServerApp builds it."""
        return CkksAggregator.from_files(public_context_path=str(self.public_context_path))

    def verifier(self) -> ReplyVerifier:
        return ReplyVerifier(self.manifest, run_id=RUN_ID)


def _build_federation(root: Path, name: str, params: CkksParameters) -> Federation:
    root.mkdir(parents=True)
    secret = create_secret_context(params)
    secret_path, public_path = root / "he-secret.ctx", root / "he-public.ctx"
    secret_path.write_bytes(serialize_secret_context(secret))
    public_path.write_bytes(serialize_public_context(secret))
    keys = {site: Ed25519PrivateKey.generate() for site in SITES}
    entries = tuple(
        SiteEntry(
            site_id=site,
            signing_public_key=raw_public_bytes(keys[site].public_key()).hex(),
            key_agreement_public_key=raw_public_bytes(X25519PrivateKey.generate().public_key()).hex(),
        )
        for site in SITES
    )
    manifest = FederationManifest(
        federation_name=name,
        created_utc="2025-01-01T00:00:00Z",
        ca_certificate_pem="",
        coordinator_host="localhost",
        coordinator_tls_fingerprint="",
        sites=entries,
    )
    return Federation(name, secret, public_path, secret_path, keys, manifest)


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
    assert chosen.values_per_ciphertext == 2048 and chosen.num_ciphertexts == 3
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


@dataclass(frozen=True)
class Signed:
    """A site's encrypted update as it travels: ciphertext record, the claim about it, the signature."""

    record: ArrayRecord
    claim: ReplyClaim
    signature: object
    node_id: int

    def site_record(self) -> ConfigRecord:
        record = site_reply_record(self.claim, b"")
        record["signature"] = self.signature  # as sent, whatever its type
        return record


def _sign(federation: Federation, claim: ReplyClaim, *, signer: str | None = None) -> bytes:
    return sign_claim(federation.signing_keys[signer or claim.site_id], claim)


def _pack(
    federation: Federation,
    *,
    site_id: str,
    server_round: int,
    run_id: str = RUN_ID,
    context: HeContext | None = None,
    chunks: list[bytes] | None = None,
) -> Signed:
    """`site_id`'s signed update: encrypted under `context` (the federation's by default)."""
    chunks = chunks or encrypt_update(context or federation.secret_context, _weights(site_id, server_round), COUNTS[site_id])
    record = chunks_to_record(chunks)
    claim = ReplyClaim(
        kind="update",
        run_id=run_id,
        server_round=server_round,
        site_id=site_id,
        payload_sha256=payload_sha256(record),
        num_examples=COUNTS[site_id],
        status="trained",
    )
    return Signed(record, claim, _sign(federation, claim), SITES.index(site_id) + 1)


def _admit(verifier: ReplyVerifier, aggregator: CkksAggregator, signed: Signed, *, server_round: int = 1) -> SiteUpdate:
    """What the round loop does with a train reply: verify the claim, check the ciphertexts, then accept both."""
    verified = verifier.verify(
        signed.site_record(),
        node_id=signed.node_id,
        kind="update",
        server_round=server_round,
        payload_sha256=payload_sha256(signed.record),
    )
    update = SiteUpdate(node_id=signed.node_id, record=signed.record, claim=verified.claim, signature=verified.signature)
    problem = aggregator.check(update)
    if problem:
        raise ReplyRejected(*problem, site_id=update.site_id)
    verifier.accept(verified)
    aggregator.accept(update)
    return update


def _rejection(verifier: ReplyVerifier, aggregator: CkksAggregator, signed: Signed, *, server_round: int = 1) -> ReplyRejected:
    """The rejection of a bad update; fails the test if it was accepted."""
    with pytest.raises(ReplyRejected) as caught:
        _admit(verifier, aggregator, signed, server_round=server_round)
    return caught.value


def _plain_average(site_ids: list[str], server_round: int) -> np.ndarray:
    total = sum(COUNTS[site] for site in site_ids)
    return sum(_weights(site, server_round) * COUNTS[site] for site in site_ids) / total


def _assert_decrypts_to_honest_average(federation: Federation, aggregate: ArrayRecord, honest: list[str], server_round: int) -> None:
    context = federation.secret_context  # any key-holding site
    average, total = decrypt_average(context, record_to_chunks(aggregate), NUM_PARAMETERS)
    expected = _plain_average(honest, server_round)
    assert total == sum(COUNTS[site] for site in honest)
    error = float(np.max(np.abs(average - expected)))
    assert error <= average_error_bound(context.parameters, num_sites=context.parameters.num_sites, total_examples=total)
    assert error <= 1e-5 * float(np.max(np.abs(expected)))


# --- the coordinator holds no key -------------------------------------------------------------------


def test_coordinator_context_is_public_and_cannot_decrypt(alpha: Federation) -> None:
    aggregator = alpha.aggregator()
    context = aggregator.public_context
    assert not context.is_private and context.secret_key is None
    assert len(alpha.public_context_path.read_bytes()) < 2000  # parameters only: no key of any kind
    assert context.key_id == alpha.secret_context.key_id  # same key set, only without the key

    verifier = alpha.verifier()
    updates = [_admit(verifier, aggregator, _pack(alpha, site_id=site, server_round=1)) for site in SITES]
    aggregate = aggregator.aggregate(updates)
    summed = record_to_chunks(aggregate)
    assert len(summed) == 3

    with pytest.raises(HeContextError, match="cannot decrypt"):
        decrypt_sum(context, summed)
    with pytest.raises(HeContextError, match="cannot decrypt"):
        decrypt_average(context, summed, NUM_PARAMETERS)
    with pytest.raises(ValueError, match="secret key is not valid"):
        sealapi.Decryptor(context.seal_context, sealapi.SecretKey())  # SEAL itself: no key to decrypt with
    # ...while every site can
    _assert_decrypts_to_honest_average(alpha, aggregate, list(SITES), server_round=1)


def test_coordinator_refuses_a_secret_context_file(alpha: Federation) -> None:
    with pytest.raises(HeContextError, match="expected a public HE context, got a secret one"):
        CkksAggregator.from_files(public_context_path=str(alpha.secret_context_path))
    secret_tail = alpha.secret_context_path.read_bytes()[-64:]
    assert secret_tail not in alpha.public_context_path.read_bytes()


def test_check_stores_nothing(alpha: Federation) -> None:
    aggregator = alpha.aggregator()
    signed = _pack(alpha, site_id="hosp1", server_round=1)
    update = SiteUpdate(node_id=2, record=signed.record, claim=signed.claim, signature=signed.signature)  # type: ignore[arg-type]
    before = dict(vars(aggregator))
    assert aggregator.check(update) is None and aggregator.check(update) is None
    assert dict(vars(aggregator)) == before


def test_the_sum_reuses_the_ciphertexts_the_check_loaded_and_equals_a_sum_of_fresh_loads(
    alpha: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    aggregator, verifier = alpha.aggregator(), alpha.verifier()
    updates = [_admit(verifier, aggregator, _pack(alpha, site_id=site, server_round=1)) for site in SITES]
    assert all(len(update.checked_payload) == 1 for update in updates)
    fresh = sum_encrypted(aggregator.public_context, [record_to_chunks(update.record) for update in updates])

    def no_second_load(*args, **kwargs):
        raise AssertionError("the sum loaded an update the check had loaded already")

    monkeypatch.setattr("medtwin.server.aggregation.load_update_chunks", no_second_load)
    assert record_to_chunks(aggregator.aggregate(updates)) == fresh
    assert record_to_chunks(aggregator.aggregate(updates[::-1])) == fresh  # the checked ciphertexts were left unchanged


def test_an_update_whose_bytes_differ_from_what_its_check_loaded_is_loaded_again(alpha: Federation) -> None:
    aggregator, verifier = alpha.aggregator(), alpha.verifier()
    first, second = (_admit(verifier, aggregator, _pack(alpha, site_id=site, server_round=1)) for site in ("hosp0", "hosp1"))
    third = _pack(alpha, site_id="hosp2", server_round=1)
    swapped = replace(second, record=third.record)  # keeps the loads of hosp1's bytes
    assert swapped.checked_payload is second.checked_payload
    expected = sum_encrypted(aggregator.public_context, [record_to_chunks(first.record), record_to_chunks(third.record)])
    assert record_to_chunks(aggregator.aggregate([first, swapped])) == expected


def test_a_chunk_that_does_not_load_is_refused_at_check_time_and_leaves_nothing_loaded(alpha: Federation) -> None:
    aggregator = alpha.aggregator()
    signed = _pack(alpha, site_id="hosp1", server_round=1)
    chunks = record_to_chunks(signed.record)
    header = bytearray(chunks[1][: CHUNK_HEADER.size])
    body = np.frombuffer(chunks[1][CHUNK_HEADER.size + 65 :], dtype=np.uint8).copy()
    body[:4] = 0xFF  # the first coefficient reads as 2^bits - 1 >= q
    tampered = chunks[:1] + [bytes(header) + chunks[1][CHUNK_HEADER.size : CHUNK_HEADER.size + 65] + body.tobytes()] + chunks[2:]
    update = SiteUpdate(node_id=2, record=chunks_to_record(tampered), claim=signed.claim, signature=signed.signature)  # type: ignore[arg-type]
    code, reason = aggregator.check(update)
    assert code == "ciphertext_mismatch" and "not below the prime" in reason
    assert update.checked_payload == {}


# --- encrypted FedAvg == plaintext FedAvg -------------------------------------------------------------


@pytest.mark.parametrize("honest", [list(SITES), ["hosp0", "hosp2"], ["hosp3"]], ids=["all", "two", "smallest-alone"])
def test_encrypted_fedavg_equals_plaintext_weighted_average(alpha: Federation, honest: list[str]) -> None:
    aggregator, verifier = alpha.aggregator(), alpha.verifier()
    updates = [_admit(verifier, aggregator, _pack(alpha, site_id=site, server_round=1)) for site in honest]
    aggregate = aggregator.aggregate(updates)
    context = alpha.secret_context
    average, total = decrypt_average(context, record_to_chunks(aggregate), NUM_PARAMETERS)
    expected = _plain_average(honest, 1)
    error = float(np.max(np.abs(average - expected)))
    assert total == sum(COUNTS[site] for site in honest)
    assert error <= average_error_bound(context.parameters, num_sites=context.parameters.num_sites, total_examples=total)
    if total >= 500:  # the relative target holds near full scale (max_total_examples = 1000)
        assert error <= 1e-5 * float(np.max(np.abs(expected)))
    assert error > 0.0  # it really went through CKKS (approximate arithmetic), not a plaintext shortcut


# --- rejections: each bad update is refused with a code, the honest round still closes -----------------


def _flip_a_ciphertext_byte(signed: Signed) -> Signed:
    chunks = record_to_chunks(signed.record)
    body = bytearray(chunks[1])
    body[CHUNK_HEADER.size + len(body) // 2] ^= 0x01
    chunks[1] = bytes(body)
    return replace(signed, record=chunks_to_record(chunks))


def _tampered(alpha: Federation, beta: Federation) -> Signed:
    return _flip_a_ciphertext_byte(_pack(alpha, site_id="hosp2", server_round=1))


def _signed_by_another_site(alpha: Federation, beta: Federation) -> Signed:
    signed = _pack(alpha, site_id="hosp2", server_round=1)
    return replace(signed, signature=_sign(alpha, signed.claim, signer="hosp3"))


def _random_signature(alpha: Federation, beta: Federation) -> Signed:
    return replace(_pack(alpha, site_id="hosp2", server_round=1), signature=os.urandom(64))


def _no_signature(alpha: Federation, beta: Federation) -> Signed:
    return replace(_pack(alpha, site_id="hosp2", server_round=1), signature=b"")


def _signature_as_hex_text(alpha: Federation, beta: Federation) -> Signed:
    signed = _pack(alpha, site_id="hosp2", server_round=1)
    return replace(signed, signature=bytes(signed.signature).hex())  # type: ignore[arg-type]


def _signed_for_another_run(alpha: Federation, beta: Federation) -> Signed:
    """hosp2's genuine update from another run of the same federation (the coordinator checks RUN_ID)."""
    return _pack(alpha, site_id="hosp2", server_round=1, run_id="run-other")


def _unknown_site(alpha: Federation, beta: Federation, *, server_round: int = 1) -> Signed:
    signed = _pack(alpha, site_id="hosp2", server_round=server_round)
    claim = replace(signed.claim, site_id="mallory")
    return Signed(signed.record, claim, sign_claim(Ed25519PrivateKey.generate(), claim), node_id=99)


def _wrong_key_set(alpha: Federation, beta: Federation) -> Signed:
    """hosp2 signs correctly, but encrypted under the other federation's CKKS key."""
    return _pack(alpha, site_id="hosp2", server_round=1, context=beta.secret_context)


def _other_federation(alpha: Federation, beta: Federation) -> Signed:
    """An update from the other federation's hosp2 (its own signing key and CKKS key)."""
    return _pack(beta, site_id="hosp2", server_round=1)


def _signed_but_malformed(alpha: Federation, beta: Federation) -> Signed:
    """A correctly signed update missing its last ciphertext chunk."""
    chunks = record_to_chunks(_pack(alpha, site_id="hosp2", server_round=1).record)[:-1]
    return _pack(alpha, site_id="hosp2", server_round=1, chunks=chunks)


def _signed_but_foreign_arrays(alpha: Federation, beta: Federation) -> Signed:
    """A correctly signed update whose record holds an array that is not a ciphertext chunk."""
    record = _pack(alpha, site_id="hosp2", server_round=1).record
    record["payload"] = record["chunk-00000"]
    signed = _pack(alpha, site_id="hosp2", server_round=1)
    claim = replace(signed.claim, payload_sha256=payload_sha256(record))
    return Signed(record, claim, _sign(alpha, claim), signed.node_id)


# (builder, code, key words the reason must contain); each bad update arrives BEFORE the sites' genuine ones,
# so the test also shows that a refused forgery does not lock the real site out of the round
FORGERIES: dict[str, tuple[Callable[[Federation, Federation], Signed], str, tuple[str, ...]]] = {
    "tampered-ciphertext-byte": (_tampered, "digest_mismatch", ("hosp2", "signed payload")),
    "signature-by-another-site": (_signed_by_another_site, "bad_signature", ("signature rejected", "hosp2")),
    "random-signature-bytes": (_random_signature, "bad_signature", ("signature rejected", "hosp2")),
    "empty-signature": (_no_signature, "bad_signature", ("64 bytes", "hosp2")),
    "signature-as-hex-text": (_signature_as_hex_text, "bad_signature", ("64 bytes", "str")),
    "signed-for-another-run": (_signed_for_another_run, "wrong_run", ("run-other", RUN_ID)),
    "unknown-site": (_unknown_site, "unknown_site", ("unknown site", "mallory", "alpha")),
    "wrong-he-key-set": (_wrong_key_set, "ciphertext_mismatch", ("key set", "chunk 0")),
    "other-federation": (_other_federation, "bad_signature", ("signature rejected", "hosp2")),
    "signed-but-missing-a-chunk": (_signed_but_malformed, "ciphertext_mismatch", ("2 ciphertext chunks", "need 3")),
    "signed-but-foreign-arrays": (_signed_but_foreign_arrays, "malformed_update", ("hosp2", "payload")),
}


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_bad_update_is_rejected_and_round_closes_with_honest_average(
    alpha: Federation, beta: Federation, case: str
) -> None:
    build, expected_code, key_words = FORGERIES[case]
    aggregator, verifier = alpha.aggregator(), alpha.verifier()
    bad = build(alpha, beta)
    rejection = _rejection(verifier, aggregator, replace(bad, node_id=50))  # hosp2's real node is not the forger
    assert rejection.code == expected_code, f"{case}: code {rejection.code!r}, reason {rejection.reason!r}"
    for word in key_words:
        assert word in rejection.reason, f"{case}: {word!r} not in {rejection.reason!r}"

    honest = [_admit(verifier, aggregator, _pack(alpha, site_id=site, server_round=1)) for site in SITES]
    _assert_decrypts_to_honest_average(alpha, aggregator.aggregate(honest), list(SITES), server_round=1)


@pytest.mark.parametrize("second", ["same-update-again", "fresh-second-update"])
def test_second_update_from_a_site_in_one_round_is_rejected(alpha: Federation, second: str) -> None:
    aggregator, verifier = alpha.aggregator(), alpha.verifier()
    signed = {site: _pack(alpha, site_id=site, server_round=1) for site in SITES}
    honest = [_admit(verifier, aggregator, signed[site]) for site in SITES]
    if second == "same-update-again":
        again, code, key_words = signed["hosp1"], "replay", ("already accepted", "hosp1", "round 1")
    else:  # properly signed, different ciphertext: still one vote per site per round
        again, code, key_words = _pack(alpha, site_id="hosp1", server_round=1), "duplicate", ("hosp1", "round 1")
    rejection = _rejection(verifier, aggregator, again)
    assert rejection.code == code and rejection.site_id in ("", "hosp1")
    for word in key_words:
        assert word in rejection.reason, f"{word!r} not in {rejection.reason!r}"
    _assert_decrypts_to_honest_average(alpha, aggregator.aggregate(honest), list(SITES), server_round=1)


def test_old_round_update_replayed_in_a_later_round_is_rejected(alpha: Federation) -> None:
    aggregator, verifier = alpha.aggregator(), alpha.verifier()
    round_1 = {site: _pack(alpha, site_id=site, server_round=1) for site in SITES}
    aggregator.aggregate([_admit(verifier, aggregator, round_1[site]) for site in SITES])

    # round 2: hosp2's reply is its round-1 update (ciphertext + claim + signature)
    rejection = _rejection(verifier, aggregator, round_1["hosp2"], server_round=2)
    assert rejection.code == "replay" and "hosp2" in rejection.reason and "round 1" in rejection.reason
    # a coordinator restarted since round 1 has no memory of digests: the signed round still refuses it
    rejection = _rejection(alpha.verifier(), alpha.aggregator(), round_1["hosp2"], server_round=2)
    assert rejection.code == "wrong_round" and "round 1" in rejection.reason and "round 2" in rejection.reason

    honest_2 = [_admit(verifier, aggregator, _pack(alpha, site_id=site, server_round=2), server_round=2) for site in ("hosp0", "hosp1", "hosp3")]
    _assert_decrypts_to_honest_average(alpha, aggregator.aggregate(honest_2), ["hosp0", "hosp1", "hosp3"], server_round=2)


# --- the same, through the coordinator's round loop -----------------------------------------------------


def _reply(signed: Signed, *, node_id: int | None = None) -> Message:
    """A site's train reply as the Grid hands it to the loop (Flower's Message, metadata set as the SuperLink would)."""
    node_id = node_id or signed.node_id
    server_round = signed.claim.server_round
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node_id}-{server_round}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"ins-{node_id}-{server_round}",
        group_id="",
        created_at=0.0,
        ttl=600.0,
        message_type="train",
    )
    return Message(content=RecordDict({UPDATE: signed.record, SITE: signed.site_record()}), metadata=metadata)


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
        manifest=alpha.manifest,
        artifacts=ArtifactStore(tmp_path / "artifacts"),
        on_record=records.append,
    )
    round_1 = {site: _pack(alpha, site_id=site, server_round=1) for site in SITES}
    honest_2 = {site: _pack(alpha, site_id=site, server_round=2) for site in ("hosp0", "hosp1")}
    intruder = _unknown_site(alpha, alpha, server_round=2)
    tampered_3 = _flip_a_ciphertext_byte(_pack(alpha, site_id="hosp3", server_round=2))
    replies = {
        1: [_reply(round_1[site]) for site in SITES],
        2: [
            _reply(honest_2["hosp0"]),
            _reply(round_1["hosp2"]),  # replays its round-1 reply
            _reply(tampered_3),  # altered in transit
            _reply(intruder),
            _reply(honest_2["hosp1"]),
        ],
    }
    monkeypatch.setattr(loop, "_send", lambda node_ids, *, phase, server_round: replies[server_round])

    nodes = [SITES.index(site) + 1 for site in SITES]
    loop.train_round(1, nodes)
    loop.train_round(2, [*nodes, 99])

    first, second = records
    assert first["participants"] == list(SITES) and first["rejected"] == {}
    assert second["participants"] == ["hosp0", "hosp1"]
    rejected = second["rejected"]
    assert set(rejected) == {"hosp2", "hosp3", "node-99"}  # an unverified intruder is named by its node only
    assert rejected["hosp2"].startswith("replay: ") and "round 1" in rejected["hosp2"]
    assert rejected["hosp3"].startswith("digest_mismatch: ")
    assert rejected["node-99"].startswith("unknown_site: ") and "mallory" in rejected["node-99"]
    assert [(rejection.server_round, rejection.site_id, rejection.code) for rejection in loop.result.rejections] == [
        (2, "hosp2", "replay"), (2, "hosp3", "digest_mismatch"), (2, "node-99", "unknown_site"),
    ]
    assert loop.result.accepted_updates == 6
    assert ArtifactStore(tmp_path / "artifacts").exists(second["aggregate_sha256"])
    certificate = loop.result.certificate
    assert certificate is not None and certificate.server_round == 2
    assert certificate.aggregate_sha256 == second["aggregate_sha256"] == payload_sha256(loop.result.aggregate)
    assert [claim.site_id for claim, _ in certificate.claims] == ["hosp0", "hosp1"]
    _assert_decrypts_to_honest_average(alpha, loop.result.aggregate, ["hosp0", "hosp1"], server_round=2)
