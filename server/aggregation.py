"""Aggregation at the coordinator: it only ever sums site payloads, so encrypted schemes slot in.

Who sent an update, and whether it may count (signatures, replays, unknown sites), is the
`ReplyVerifier`'s job, the same for every scheme. An aggregator sees only updates whose claims
verified, and checks what is specific to its payload: `PlainAggregator` finite float32 weights of
the federation's size and the signed example count; `CkksAggregator` ciphertext chunks
that load under the federation's public CKKS context (it holds no key and cannot read them).
`check` never stores anything in the aggregator; `accept` records an update as part of the round.
What a check derives from an update's bytes may travel with that update (`SiteUpdate.checked_payload`:
the CKKS ciphertexts SEAL loaded), so summing does not load them again.
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
from medtwin.core.identity import ReplyClaim
from medtwin.core.plain_payload import PLAIN_PAYLOAD, PlainPayloadError, read_plain_update, sum_plain_updates
from medtwin.core.protocol import chunks_to_record, record_to_chunks

CHUNK_NAME = "chunk-{:05d}"


@dataclass(frozen=True)
class SiteUpdate:
    """An update whose signed claim verified: its site, round and example count are the claim's."""

    node_id: int
    record: ArrayRecord
    claim: ReplyClaim
    signature: bytes
    # what an aggregator's check loaded from `record`, keyed by the digest of the bytes it loaded; reused
    # only while `record` still digests the same (the update is discarded with it when it is rejected)
    checked_payload: dict[bytes, object] = field(default_factory=dict, compare=False, repr=False)

    @property
    def site_id(self) -> str:
        return self.claim.site_id

    @property
    def server_round(self) -> int:
        return self.claim.server_round

    @property
    def num_examples(self) -> int:
        return self.claim.num_examples


@dataclass(frozen=True)
class Rejection:
    site_id: str  # the verified site, else the node's label ("node-7")
    node_id: int
    reason: str
    server_round: int = 0
    code: str = "rejected"  # short on-chain label


Problem = tuple[str, str]  # (short code, human-readable reason)


class Aggregator(Protocol):
    scheme: str

    def check(self, update: SiteUpdate) -> Problem | None:
        """None if the payload is acceptable, else (code, reason) of its rejection; stores nothing."""

    def accept(self, update: SiteUpdate) -> None:
        """Record a checked update as part of the round (e.g. pin the federation's payload shape)."""

    def aggregate(self, updates: list[SiteUpdate]) -> ArrayRecord:
        """The sum of the accepted updates, in the same payload format."""

    def describe(self) -> dict:
        """Scheme and parameters for summary.json (nothing secret)."""

    def sum_error_bound(self, num_updates: int) -> float:
        """Bound on |decrypted sum - exact sum| in any slot (0 for plaintext)."""


class PlainAggregator:
    """Plaintext sum of updates (crypto=plain): float32 weights and integer counts in, float64 Σ n_i·w_i out."""

    scheme = "plain"

    def __init__(self) -> None:
        self.expected_shape: tuple[int, ...] | None = None  # pinned by the first accepted update

    def check(self, update: SiteUpdate) -> Problem | None:
        try:
            payload = read_plain_update(update.record)
        except PlainPayloadError as error:
            return "malformed_update", str(error)
        shape = payload.weights.shape
        if self.expected_shape is not None and shape != self.expected_shape:
            return "shape_mismatch", f"update shape {shape} differs from the federation's {self.expected_shape}"
        if payload.num_examples != update.num_examples:
            return (
                "malformed_update",
                f"update's example count {payload.num_examples} is not the {update.num_examples} its claim signs",
            )
        return None

    def accept(self, update: SiteUpdate) -> None:
        if self.expected_shape is None:
            self.expected_shape = tuple(update.record[PLAIN_PAYLOAD].shape)

    def aggregate(self, updates: list[SiteUpdate]) -> ArrayRecord:
        return sum_plain_updates([update.record for update in updates])

    def describe(self) -> dict:
        return {"scheme": self.scheme, "parameters": {"update_dtype": "float32", "sum_dtype": "float64"}}

    def sum_error_bound(self, num_updates: int) -> float:
        return 0.0


@dataclass
class CkksAggregator:
    """Sums CKKS ciphertexts with a key-less public context; refuses chunks that do not fit it."""

    public_context: HeContext
    scheme: str = "ckks"

    @classmethod
    def from_files(cls, *, public_context_path: str) -> CkksAggregator:
        with open(public_context_path, "rb") as handle:
            context = load_context(handle.read(), expected_kind="public")
        if context.is_private:
            raise MedtwinError(f"{public_context_path} holds a secret key: the coordinator must only get the public context")
        return cls(public_context=context)

    def check(self, update: SiteUpdate) -> Problem | None:
        chunks = record_to_chunks(update.record)
        expected_names = [CHUNK_NAME.format(index) for index in range(len(chunks))]
        if sorted(update.record) != expected_names:
            return "malformed_update", f"{update.site_id}'s update holds arrays {sorted(update.record)[:4]}, expected only chunk-00000..."
        if any(not isinstance(chunk, bytes) for chunk in chunks):
            return "malformed_update", f"{update.site_id}'s update holds chunks that are not bytes"
        try:
            ciphertexts = load_update_chunks(self.public_context, chunks, label=f"{update.site_id}'s update")
        except (MedtwinError, ValueError) as error:
            return "ciphertext_mismatch", str(error)
        update.checked_payload.clear()
        update.checked_payload[update_digest(chunks)] = ciphertexts  # the update's own bytes, loaded; summing reuses them
        return None

    def accept(self, update: SiteUpdate) -> None:
        """Nothing to pin: the public context fixes every chunk's shape."""

    def aggregate(self, updates: list[SiteUpdate]) -> ArrayRecord:
        """Sum the updates `check` approved, from the ciphertexts the check loaded when the update's bytes are
        still the ones it loaded (else loaded again). Leaves those ciphertexts unchanged."""
        return chunks_to_record(sum_loaded(self.public_context, [self._ciphertexts(update) for update in updates]))

    def _ciphertexts(self, update: SiteUpdate) -> list:
        chunks = record_to_chunks(update.record)
        checked = update.checked_payload.get(update_digest(chunks))
        if checked is not None:
            return checked
        return load_update_chunks(self.public_context, chunks, label=f"{update.site_id}'s update")

    def describe(self) -> dict:
        return {"scheme": self.scheme, "parameters": self.public_context.parameters.to_dict()}

    def sum_error_bound(self, num_updates: int) -> float:
        return decryption_error_bound(self.public_context.parameters, num_updates)
