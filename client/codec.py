"""How a site reads the aggregate it receives and packs the update it sends: plain or CKKS-encrypted."""

from __future__ import annotations

import io

import numpy as np
from flwr.app import ArrayRecord

from medtwin.core.he import HeContext, decrypt_average, encrypt_update, update_digest
from medtwin.core.he.params import average_error_bound
from medtwin.core.identity import SiteKit, load_site_he_context, load_site_kit, sign_update
from medtwin.core.rundir import atomic_write_bytes
from medtwin.core.protocol import (
    average_from_sum,
    chunks_to_record,
    pack_plain_update,
    record_to_chunks,
    unpack_plain,
)


class PlainSiteCodec:
    scheme = "plain"

    def average(self, aggregate: ArrayRecord) -> tuple[np.ndarray, float]:
        return average_from_sum(unpack_plain(aggregate))

    def error_bound(self, *, total_examples: float) -> float:
        return 0.0

    def pack(self, weights: np.ndarray, *, num_examples: int, run_id: str, server_round: int) -> tuple[ArrayRecord, dict]:
        return pack_plain_update(weights, num_examples=num_examples), {}


class CkksSiteCodec:
    """Decrypts with the site's secret CKKS context; encrypts and signs with its kit's keys."""

    scheme = "ckks"

    def __init__(self, kit: SiteKit, context: HeContext) -> None:
        self.kit = kit
        self.context = context

    @classmethod
    def from_kit(cls, kit_dir: str) -> CkksSiteCodec:
        kit = load_site_kit(kit_dir)
        return cls(kit, load_site_he_context(kit))

    def average(self, aggregate: ArrayRecord) -> tuple[np.ndarray, float]:
        chunks = record_to_chunks(aggregate)
        return decrypt_average(self.context, chunks, self.context.parameters.num_parameters)

    def error_bound(self, *, total_examples: float) -> float:
        """Bound on |decrypted average - exact average| of any weight (sums over at most num_sites sites)."""
        parameters = self.context.parameters
        return average_error_bound(parameters, num_sites=parameters.num_sites, total_examples=total_examples)

    def pack(self, weights: np.ndarray, *, num_examples: int, run_id: str, server_round: int) -> tuple[ArrayRecord, dict]:
        chunks = encrypt_update(self.context, weights, num_examples)
        # the site keeps its own plaintext update (it never leaves the site): lets it, or a simulation
        # harness acting for it, measure the aggregate's real decryption error
        kept = io.BytesIO()
        np.save(kept, np.append(weights * num_examples, float(num_examples)))
        atomic_write_bytes(self.kit.path / "state" / f"last-update-{run_id}.npy", kept.getvalue(), mode=0o600)
        signature = sign_update(
            self.kit.signing_key,
            run_id=run_id,
            server_round=server_round,
            site_id=self.kit.site_id,
            ciphertext_digest=update_digest(chunks),
        )
        return chunks_to_record(chunks), {"signature": signature}
