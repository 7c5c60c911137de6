"""Before a site decrypts or evaluates an aggregate, it checks where the aggregate came from.

The coordinator sends a `RoundCertificate` beside every aggregate: the round it closes, its hash,
and the signed claims of the updates it sums. The site accepts it only if every claim verifies
against the federation manifest (the site's own copy), enough distinct sites took part, the hash
matches the aggregate received, and — once decoded — the aggregate's example count equals the sum
of the claimed counts. A single site's ciphertext presented as an "aggregate" fails the last check
(its count is that one site's), so no site ever evaluates or trains on another site's update alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord

from medtwin.core.identity import FederationManifest, IdentityError, verify_claim
from medtwin.core.protocol import RoundCertificate, payload_sha256

__all__ = ["VerifiedAggregate", "check_example_count", "verify_certificate"]


class AggregateRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedAggregate:
    server_round: int
    aggregate_sha256: str
    participants: tuple[str, ...]
    claimed_examples: int


def verify_certificate(
    certificate_record: object,
    aggregate: ArrayRecord,
    *,
    manifest: FederationManifest,
    run_id: str,
    server_round: int,
    min_participants: int,
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
    for claim, signature in certificate.claims:
        if claim.kind != "update" or claim.status != "trained" or claim.run_id != run_id or claim.server_round != server_round:
            raise AggregateRefused(f"the certificate holds a claim of {claim.site_id!r} that is not a trained update of this round")
        if claim.site_id not in known:
            raise AggregateRefused(f"the certificate names {claim.site_id!r}, who is not in this federation")
        if claim.site_id in participants:
            raise AggregateRefused(f"the certificate names {claim.site_id!r} twice")
        try:
            verify_claim(manifest.site(claim.site_id).signing_public_key, signature, claim)
        except IdentityError as error:
            raise AggregateRefused(f"a claim in the certificate does not verify: {error}") from None
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
    )


def check_example_count(verified: VerifiedAggregate, total_examples: float, *, error_bound: float) -> None:
    """The decoded example count must be the claimed sum (CKKS error allowed); else refuse the aggregate."""
    if abs(total_examples - verified.claimed_examples) > 0.5 + error_bound:
        raise AggregateRefused(
            f"the decoded aggregate counts {total_examples:.1f} examples but its certified participants claim "
            f"{verified.claimed_examples}: it is not the sum it claims to be"
        )
