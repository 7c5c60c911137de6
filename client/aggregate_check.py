"""A site never decrypts what the coordinator calls an aggregate: it sums the certified updates itself.

Beside every aggregate the coordinator sends a `RoundCertificate` (the round it closes, its hash,
the signed claims of the updates it sums) and those updates themselves. The site accepts them only
if every claim verifies against the federation manifest (the site's own copy), enough distinct
sites took part, each update's digest is exactly the one its site signed, and the aggregate the
coordinator sent hashes to the certified hash. It then adds the certified updates up itself (plain
floats, or CKKS ciphertexts with its own context) and decodes only that sum, whose example count
must equal the claimed total. So no coordinator can make a site decrypt, evaluate or train on one
site's update, a scaled copy, any other combination, or a model of its own making.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from medtwin.core.errors import MedtwinError
from medtwin.core.identity import FederationManifest, IdentityError, verify_claim
from medtwin.core.protocol import MalformedPayloads, RoundCertificate, payload_sha256, unpack_payloads

__all__ = ["AggregateRefused", "VerifiedAggregate", "check_decoded_sum", "decode_certified", "shared_payloads", "verify_certificate"]


class AggregateRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def shared_payloads(content: RecordDict, name: str) -> dict[str, ArrayRecord]:
    """The payload records (a sum and its certified updates) a coordinator packed under `name`; ones it
    packed badly are refused like any other unusable aggregate."""
    try:
        return unpack_payloads(content, name)
    except MalformedPayloads as error:
        raise AggregateRefused(str(error)) from None


@dataclass(frozen=True)
class VerifiedAggregate:
    server_round: int
    aggregate_sha256: str
    participants: tuple[str, ...]
    claimed_examples: int
    updates: tuple[ArrayRecord, ...] = ()  # the certified updates, each matching its signed digest
    started_from: tuple[str, ...] = ()  # per update: the shared state its site says it trained from
    global_state_sha256: str = ""  # the site's shared state after this round's step (client/global_state.py)


def verify_certificate(
    certificate_record: object,
    aggregate: ArrayRecord,
    certified: list[ArrayRecord],
    *,
    manifest: FederationManifest,
    run_id: str,
    server_round: int,
    min_participants: int,
    max_site_examples: int | None = None,
    status: str = "trained",
) -> VerifiedAggregate:
    """Raise `AggregateRefused` unless the certificate vouches for exactly this aggregate of `server_round`."""
    if certificate_record is None:
        raise AggregateRefused("the aggregate comes without a round certificate")
    try:
        certificate = RoundCertificate.from_record(certificate_record)
    except IdentityError as error:
        raise AggregateRefused(str(error)) from None
    if certificate.server_round != server_round:
        raise AggregateRefused(f"the certificate is for round {certificate.server_round}, expected round {server_round}")
    digest = payload_sha256(aggregate)
    if digest != certificate.aggregate_sha256:
        raise AggregateRefused("the aggregate's hash differs from the one its certificate names")
    participants: dict[str, int] = {}
    known = set(manifest.site_ids)
    by_digest: dict[str, ArrayRecord] = {}
    for record in certified:
        by_digest.setdefault(payload_sha256(record), record)
    if len(certified) != len(certificate.claims) or len(by_digest) != len(certified):
        raise AggregateRefused(
            f"the message carries {len(certified)} certified update(s) for {len(certificate.claims)} claim(s): "
            "each signed update must come exactly once"
        )
    for claim, signature in certificate.claims:
        if claim.kind != "update" or claim.status != status or claim.run_id != run_id or claim.server_round != server_round:
            raise AggregateRefused(f"the certificate holds a claim of {claim.site_id!r} that is not a {status} update of this round")
        if claim.site_id not in known:
            raise AggregateRefused(f"the certificate names {claim.site_id!r}, who is not in this federation")
        if claim.site_id in participants:
            raise AggregateRefused(f"the certificate names {claim.site_id!r} twice")
        if max_site_examples is not None and claim.num_examples > max_site_examples:
            raise AggregateRefused(
                f"{claim.site_id!r} claims {claim.num_examples} examples, above the run's max_site_examples {max_site_examples}"
            )
        try:
            verify_claim(manifest.site(claim.site_id).signing_public_key, signature, claim)
        except IdentityError as error:
            raise AggregateRefused(f"a claim in the certificate does not verify: {error}") from None
        if claim.payload_sha256 not in by_digest:
            raise AggregateRefused(f"the update {claim.site_id!r} signed is not among the certified updates sent")
        participants[claim.site_id] = claim.num_examples
    if len(participants) < min_participants:
        raise AggregateRefused(
            f"the aggregate sums {len(participants)} site(s); this site decrypts only aggregates of at least "
            f"{min_participants} (its evaluation.min_participants / the run's federation.min_sites)"
        )
    return VerifiedAggregate(
        server_round=server_round,
        aggregate_sha256=digest,
        participants=tuple(sorted(participants)),
        claimed_examples=sum(participants.values()),
        updates=tuple(by_digest[claim.payload_sha256] for claim, _ in certificate.claims),
        started_from=tuple(claim.aggregate_sha256 for claim, _ in certificate.claims),
    )


def check_decoded_sum(
    verified: VerifiedAggregate, average: np.ndarray, total_examples: float, *, error_bound: float, max_abs_average: float = np.inf
) -> None:
    """The site's own sum must count the claimed examples (a site that packed another count than it
    signed makes every honest site refuse the round) and hold finite weights within the scheme's range
    (an encrypted sum past it has wrapped: a participant packed weights beyond the bound); else refuse it."""
    if abs(total_examples - verified.claimed_examples) > 0.5 + error_bound:
        raise AggregateRefused(
            f"the certified updates sum to {total_examples:.1f} examples but their sites claim "
            f"{verified.claimed_examples}: a participant packed another count than it signed"
        )
    if not np.all(np.isfinite(average)):
        raise AggregateRefused("the sum of the certified updates holds non-finite weights")
    largest = float(np.max(np.abs(average), initial=0.0))
    if largest > max_abs_average:
        raise AggregateRefused(
            f"the certified updates average to a weight of {largest:.3g}, beyond the {max_abs_average:.3g} an honest sum "
            "can reach: a participant packed weights past crypto.max_abs_weight_bound"
        )


def decode_certified(codec, verified: VerifiedAggregate, *, unusable: str) -> tuple[np.ndarray, float]:
    """The site's own sum of the certified updates, decoded by its codec (plain or CKKS) and checked against
    the signed counts with the error bound of the real participants: (average, total examples). `unusable`
    opens the refusal when the updates do not decode."""
    try:
        average, total_examples = codec.average_of(verified.updates)
    except (MedtwinError, ValueError) as error:  # e.g. ciphertexts of another key set, a count <= 0
        raise AggregateRefused(f"{unusable} ({str(error)[:200]})") from None
    sites = len(verified.participants)
    check_decoded_sum(
        verified, average, total_examples, error_bound=codec.count_error_bound(num_sites=sites),
        max_abs_average=codec.max_abs_average(total_examples=total_examples, num_sites=sites),
    )  # fmt: skip
    return average, total_examples
