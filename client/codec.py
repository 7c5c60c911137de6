"""How a site reads the aggregate it receives and packs the update it sends: plain or CKKS-encrypted.

Codecs only encode and decode; the site signs what leaves it (client/app.py) for every scheme.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord

from medtwin.core.he import HeContext, decrypt_average, decrypt_average_of_updates, encrypt_update, sum_encrypted
from medtwin.core.he.params import average_error_bound, decryption_error_bound
from medtwin.core.identity import load_site_he_context
from medtwin.core.plain_payload import average_from_sum, pack_plain_update, sum_plain_updates
from medtwin.core.protocol import chunks_to_record, record_to_chunks
from medtwin.core.rundir import atomic_write_bytes


class PlainSiteCodec:
    """Sends the site's float32 weights and count; sums certified updates in float64 (core/plain_payload.py)."""

    scheme = "plain"

    def average(self, aggregate: ArrayRecord) -> tuple[np.ndarray, float]:
        return average_from_sum(aggregate)

    def error_bound(self, *, total_examples: float, num_sites: int = 0) -> float:
        return 0.0

    def count_error_bound(self, *, num_sites: int = 0) -> float:
        return 0.0

    def max_abs_average(self, *, total_examples: float, num_sites: int = 0) -> float:
        return math.inf  # plain sums cannot wrap

    def sum(self, updates: Sequence[ArrayRecord]) -> ArrayRecord:
        """The site's own sum of certified updates: the coordinator's function, so the same bits."""
        return sum_plain_updates(list(updates))

    def average_of(self, updates: Sequence[ArrayRecord]) -> tuple[np.ndarray, float]:
        """`average(sum(updates))`."""
        return self.average(self.sum(updates))

    def pack(self, weights: np.ndarray, *, num_examples: int, run_id: str) -> ArrayRecord:
        return pack_plain_update(weights, num_examples=num_examples)


class CkksSiteCodec:
    """Decrypts with the site's secret CKKS context for the run's key id; encrypts its update."""

    scheme = "ckks"

    def __init__(self, context: HeContext, *, kit_dir: Path) -> None:
        self.context = context
        self.kit_dir = Path(kit_dir)

    @classmethod
    def from_kit(cls, kit_dir: str | Path, key_id: str = "") -> CkksSiteCodec:
        return cls(load_site_he_context(kit_dir, key_id or None), kit_dir=Path(kit_dir))

    def average(self, aggregate: ArrayRecord) -> tuple[np.ndarray, float]:
        chunks = record_to_chunks(aggregate)
        return decrypt_average(self.context, chunks, self.context.parameters.num_parameters)

    def error_bound(self, *, total_examples: float, num_sites: int = 0) -> float:
        """Bound on |decrypted average - exact average| of any weight, for a sum of `num_sites` updates — never
        fewer than the key set was made for (a key set made for fewer sites than take part is not a smaller error)."""
        parameters = self.context.parameters
        sites = max(parameters.num_sites, num_sites)
        return average_error_bound(parameters, num_sites=sites, total_examples=total_examples)

    def max_abs_average(self, *, total_examples: float, num_sites: int = 0) -> float:
        """Largest |average weight| an honest sum can decrypt to: every site encodes |w| <= B, so more
        means a participant packed values past B and the sum wrapped modulo the ciphertext's prime."""
        return self.context.parameters.max_abs_weight_bound + self.error_bound(total_examples=total_examples, num_sites=num_sites)

    def count_error_bound(self, *, num_sites: int = 0) -> float:
        """Bound on the absolute error of the decrypted example count: the count slot holds B * sum n_i
        (B = max_abs_weight_bound, the weights' full scale), so its error is the slot's bound over B."""
        parameters = self.context.parameters
        return decryption_error_bound(parameters, max(parameters.num_sites, num_sites)) / parameters.max_abs_weight_bound

    def sum(self, updates: Sequence[ArrayRecord]) -> ArrayRecord:
        """The site's own homomorphic sum of certified updates (chunks from another key set are refused)."""
        return chunks_to_record(sum_encrypted(self.context, [record_to_chunks(update) for update in updates]))

    def average_of(self, updates: Sequence[ArrayRecord]) -> tuple[np.ndarray, float]:
        """`average(sum(updates))`, the same values and checks, without serializing the sum in between."""
        chunks = [record_to_chunks(update) for update in updates]
        return decrypt_average_of_updates(self.context, chunks, self.context.parameters.num_parameters)

    def pack(self, weights: np.ndarray, *, num_examples: int, run_id: str) -> ArrayRecord:
        chunks = encrypt_update(self.context, weights, num_examples)
        # the site keeps its own plaintext update (it never leaves the site): lets it, or a simulation
        # harness acting for it, measure the aggregate's real decryption error
        kept = io.BytesIO()
        np.save(kept, np.append(weights * num_examples, float(num_examples)))
        atomic_write_bytes(self.kit_dir / "state" / f"last-update-{run_id}.npy", kept.getvalue(), mode=0o600)
        return chunks_to_record(chunks)
