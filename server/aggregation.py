"""Aggregation at the coordinator: it only ever sums site payloads, so encrypted schemes slot in.

`PlainAggregator` adds float vectors. `CkksAggregator` holds only the federation's public CKKS
context and the sites' public signing keys: it verifies every signature, refuses replays, unknown
sites and mismatched ciphertexts, and adds the rest without being able to read any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from flwr.app import ArrayRecord

from medtwin.core.errors import MedtwinError
from medtwin.core.he import (
    HeContext,
    decryption_error_bound,
    load_context,
    load_update_chunks,
    sum_loaded,
    update_digest,
)
from medtwin.core.identity import FederationManifest, verify_update
from medtwin.core.protocol import chunks_to_record, record_to_chunks, sum_plain_updates

CHUNK_NAME = "chunk-{:05d}"


@dataclass(frozen=True)
class SiteUpdate:
    site_id: str
    node_id: int
    server_round: int
    record: ArrayRecord
    signature: bytes = b""


@dataclass(frozen=True)
class Rejection:
    site_id: str
    node_id: int
    reason: str
    server_round: int = 0
    code: str = "rejected"  # short on-chain label


Problem = tuple[str, str]  # (short code, human-readable reason)


class Aggregator(Protocol):
    scheme: str

    def check(self, update: SiteUpdate, *, run_id: str) -> Problem | None:
        """None if the update is acceptable, else (code, reason) of its rejection."""

    def aggregate(self, updates: list[SiteUpdate]) -> ArrayRecord:
        """The sum of the accepted updates, in the same payload format."""

    def describe(self) -> dict:
        """Scheme and parameters for summary.json (nothing secret)."""

    def sum_error_bound(self, num_updates: int) -> float:
        """Bound on |decrypted sum - exact sum| in any slot (0 for plaintext)."""


class PlainAggregator:
    """Plaintext sum of [n_i * w_i ..., n_i] vectors (crypto=plain)."""

    scheme = "plain"

    def __init__(self) -> None:
        self.expected_shape: tuple[int, ...] | None = None

    def check(self, update: SiteUpdate, *, run_id: str) -> Problem | None:
        if "payload" not in update.record:
            return "malformed_update", "update carries no `payload` array"
        shape = tuple(update.record["payload"].shape)
        if self.expected_shape is None:
            self.expected_shape = shape
        if shape != self.expected_shape:
            return "shape_mismatch", f"update shape {shape} differs from the federation's {self.expected_shape}"
        return None

    def aggregate(self, updates: list[SiteUpdate]) -> ArrayRecord:
        return sum_plain_updates([update.record for update in updates])

    def describe(self) -> dict:
        return {"scheme": self.scheme, "parameters": {"dtype": "float64"}}

    def sum_error_bound(self, num_updates: int) -> float:
        return 0.0


@dataclass
class CkksAggregator:
    """Sums CKKS ciphertexts with a key-less public context; checks signatures and replays first."""

    public_context: HeContext
    manifest: FederationManifest
    scheme: str = "ckks"
    seen_digests: dict[bytes, tuple[int, str]] = field(default_factory=dict)  # digest -> (round, site)
    accepted: set[tuple[str, int, str]] = field(default_factory=set)  # (run, round, site)
    loaded: dict[bytes, list] = field(default_factory=dict)  # digest -> ciphertexts checked this round

    @classmethod
    def from_files(cls, *, public_context_path: str, manifest_path: str) -> CkksAggregator:
        from medtwin.core.identity import load_manifest

        with open(public_context_path, "rb") as handle:
            context = load_context(handle.read(), expected_kind="public")
        if context.is_private:
            raise MedtwinError(f"{public_context_path} holds a secret key: the coordinator must only get the public context")
        return cls(public_context=context, manifest=load_manifest(manifest_path))

    def check(self, update: SiteUpdate, *, run_id: str) -> Problem | None:
        if update.site_id not in self.manifest.site_ids:
            return "unknown_site", f"unknown site {update.site_id!r}: not in federation {self.manifest.federation_name!r}"
        chunks = record_to_chunks(update.record)
        expected_names = [CHUNK_NAME.format(index) for index in range(len(chunks))]
        if sorted(update.record) != expected_names:
            return "malformed_update", f"{update.site_id}'s update holds arrays {sorted(update.record)[:4]}…, expected only chunk-00000…"
        digest = update_digest(chunks)
        if digest in self.seen_digests:
            earlier_round, earlier_site = self.seen_digests[digest]
            return "replay", f"replay: this exact ciphertext was already submitted by {earlier_site} in round {earlier_round}"
        if (run_id, update.server_round, update.site_id) in self.accepted:
            return "replay", f"replay: {update.site_id} already has an accepted update in round {update.server_round}"
        try:
            verify_update(
                self.manifest.site(update.site_id).signing_public_key,
                update.signature,
                run_id=run_id,
                server_round=update.server_round,
                site_id=update.site_id,
                ciphertext_digest=digest,
            )
        except (MedtwinError, ValueError) as error:
            return "bad_signature", str(error)
        try:
            vectors = load_update_chunks(self.public_context, chunks, label=f"{update.site_id}'s update")
        except (MedtwinError, ValueError) as error:
            return "ciphertext_mismatch", str(error)
        self.loaded[digest] = vectors
        self.seen_digests[digest] = (update.server_round, update.site_id)
        self.accepted.add((run_id, update.server_round, update.site_id))
        return None

    def aggregate(self, updates: list[SiteUpdate]) -> ArrayRecord:
        """Sum the updates `check` accepted (their ciphertexts are already loaded and checked)."""
        digests = [update_digest(record_to_chunks(update.record)) for update in updates]
        vectors = [self.loaded.pop(digest) for digest in digests]
        self.loaded.clear()
        return chunks_to_record(sum_loaded(self.public_context, vectors))

    def describe(self) -> dict:
        return {"scheme": self.scheme, "parameters": self.public_context.parameters.to_dict()}

    def sum_error_bound(self, num_updates: int) -> float:
        return decryption_error_bound(self.public_context.parameters, num_updates)
