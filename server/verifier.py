"""Who sent a reply, and may it count: one verifier for every scheme (plain or encrypted).

Every site reply carries a SITE record with a signed `ReplyClaim`. `ReplyVerifier.verify` checks,
without storing anything, that the claim is well formed, is for this run, round and kind, names a
site of the federation, carries that site's signature, describes the payload actually received,
and does not contradict what this run already accepted (a node's site, one reply per site per
phase and round, no payload twice). Once the coordinator uses a verified reply (an update it sums,
a refusal, an evaluation), `ReplyVerifier.accept` records it, so the next `verify` knows about it. From here on the site id is the verified claim's, never a string the
reply merely states.

    verifier = ReplyVerifier(manifest, run_id="run-1")
    verified = verifier.verify(reply.content[SITE], node_id=7, kind="update", server_round=2,
                               payload_sha256=payload_sha256(reply.content[UPDATE]))
    verifier.accept(verified)  # raises ReplyRejected(code, reason) instead if anything is off
"""

from __future__ import annotations

from dataclasses import dataclass

from medtwin.core.errors import MedtwinError
from medtwin.core.identity import FederationManifest, ReplyClaim, SignatureError, verify_claim
from medtwin.core.protocol import claim_from_site_record

MAX_CODE_CHARS = 32  # on-chain reason strings are cut to 32 characters


def safe_text(text: object, *, limit: int) -> str:
    """At most `limit` printable characters (no newlines, no control codes): what a site sent, safe to log."""
    return "".join(char if char.isprintable() else "?" for char in str(text)[:limit])


def safe_code(code: object) -> str:
    """A short printable-ASCII rejection label for the auth chain."""
    cleaned = "".join(char if " " < char <= "~" else "?" for char in str(code)[:MAX_CODE_CHARS])
    return cleaned or "rejected"


class ReplyRejected(MedtwinError):
    """A reply that must not count; `code` is its short on-chain label.

    `site_id` is set only when the rejection is attributable to a verified site identity.
    """

    def __init__(self, code: str, reason: str, *, site_id: str = "") -> None:
        self.code = safe_code(code)
        self.reason = safe_text(reason, limit=300)
        self.site_id = site_id
        super().__init__(f"{self.code}: {self.reason}")


@dataclass(frozen=True)
class VerifiedClaim:
    """A claim whose signature, run, round, site and payload digest checked out for one node's reply."""

    claim: ReplyClaim
    signature: bytes
    node_id: int

    @property
    def site_id(self) -> str:
        return self.claim.site_id


class ReplyVerifier:
    """Checks every site reply of one run against the federation manifest; remembers what it accepted."""

    def __init__(self, manifest: FederationManifest, *, run_id: str) -> None:
        self.manifest = manifest
        self.run_id = run_id
        self.site_of_node: dict[int, str] = {}  # pinned by the first verified reply of each node
        self.answered: set[tuple[str, int, str]] = set()  # (kind, round, site) already accepted
        self.payloads: dict[str, tuple[int, str]] = {}  # accepted update digest -> (round, site)

    def site_of(self, node_id: int) -> str | None:
        """The site a node proved to be earlier in this run, if any."""
        return self.site_of_node.get(node_id)

    def verify(
        self,
        site_record: object,
        *,
        node_id: int,
        kind: str,
        server_round: int,
        payload_sha256: str,
        aggregate_sha256: str = "",
    ) -> VerifiedClaim:
        """The verified claim of a reply, or `ReplyRejected`; stores nothing.

        `payload_sha256` is the digest of what was actually received ("" if no payload);
        `aggregate_sha256` is the aggregate the coordinator sent (checked for evaluations).
        """
        if site_record is None:
            raise ReplyRejected("malformed_reply", "the reply has no site record")
        if not hasattr(site_record, "get") or site_record.get("claim") is None:
            raise ReplyRejected("unsigned", "the reply's site record carries no signed claim")
        try:
            claim, signature = claim_from_site_record(site_record)
        except SignatureError as error:
            raise ReplyRejected("malformed_claim", str(error)) from None
        if kind == "update" and payload_sha256 in self.payloads:
            earlier_round, earlier_site = self.payloads[payload_sha256]
            raise ReplyRejected(
                "replay", f"this exact update was already accepted from {earlier_site} in round {earlier_round}"
            )
        if claim.kind != kind:
            raise ReplyRejected("wrong_kind", f"claim is for a {claim.kind!r} reply, expected {kind!r}")
        if claim.run_id != self.run_id:
            raise ReplyRejected("wrong_run", f"claim is for run {claim.run_id!r}, this is run {self.run_id!r}")
        if claim.server_round != server_round:
            raise ReplyRejected("wrong_round", f"claim is for round {claim.server_round}, this is round {server_round}")
        if claim.site_id not in self.manifest.site_ids:
            raise ReplyRejected(
                "unknown_site",
                f"unknown site {claim.site_id!r}: not in federation {self.manifest.federation_name!r}",
            )
        try:
            verify_claim(self.manifest.site(claim.site_id).signing_public_key, signature, claim)
        except (SignatureError, TypeError, ValueError) as error:
            raise ReplyRejected("bad_signature", str(error)) from None
        site_id = claim.site_id
        if claim.payload_sha256 != payload_sha256:
            raise ReplyRejected(
                "digest_mismatch",
                f"{site_id} signed payload {claim.payload_sha256[:16]!r}..., the reply carries {payload_sha256[:16]!r}...",
                site_id=site_id,
            )
        if kind == "evaluate" and claim.payload_sha256 and claim.aggregate_sha256 != aggregate_sha256:  # not a refusal
            raise ReplyRejected(
                "wrong_aggregate",
                f"{site_id} evaluated aggregate {claim.aggregate_sha256[:16]!r}..., the coordinator sent "
                f"{aggregate_sha256[:16]!r}...",
                site_id=site_id,
            )
        pinned = self.site_of_node.get(node_id)
        if pinned is not None and pinned != site_id:
            raise ReplyRejected(
                "identity_changed", f"node {node_id} was {pinned} earlier in this run, now claims to be {site_id}", site_id=pinned
            )
        if (kind, server_round, site_id) in self.answered:
            raise ReplyRejected(
                "duplicate", f"{site_id} already has an accepted {kind} reply in round {server_round}", site_id=site_id
            )
        return VerifiedClaim(claim=claim, signature=bytes(signature), node_id=node_id)  # type: ignore[arg-type]

    def accept(self, verified: VerifiedClaim) -> None:
        """Record a verified reply: pin its node to its site, use up the site's reply and its payload."""
        claim = verified.claim
        self.site_of_node[verified.node_id] = claim.site_id
        self.answered.add((claim.kind, claim.server_round, claim.site_id))
        if claim.kind == "update" and claim.payload_sha256:
            self.payloads[claim.payload_sha256] = (claim.server_round, claim.site_id)
