"""Build a round anchor from stored artifacts, and the round manifest that makes it verifiable.

Definition (what an auditor recomputes):

- leaves = sha256 of each accepted update artifact (the update bytes exactly as stored in the
  ArtifactStore), ordered by site id (Python string order) — `medtwin.core.merkle.update_leaves`;
- update_root = `merkle_root(leaves)` (sha256, 0x00 leaf / 0x01 node prefixes);
- the round manifest (canonical JSON, stored as artifact kind "round_manifest") lists
  (site id, update sha256), the aggregate sha256 and per-site epsilon; its sha256 is anchored;
- participants_hash = sha256 of the sorted site ids joined by "\\n";
- epsilon_hash = sha256 of the canonical JSON {site id: epsilon spent in micro-units}.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

from medtwin.core.artifacts import ArtifactNotFoundError, ArtifactStore
from medtwin.core.merkle import merkle_root, update_leaves

from .encoding import from_micro, to_micro, to_pico
from .errors import ChainError
from .records import RoundAnchor

__all__ = [
    "MANIFEST_KIND",
    "MANIFEST_SCHEMA",
    "RoundManifest",
    "build_round_anchor",
    "epsilon_hash",
    "participants_hash",
]

MANIFEST_KIND = "round_manifest"
MANIFEST_SCHEMA = "medtwin.round-manifest/1"


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a manifest holds")


def _text(value: object) -> str:
    """A manifest's string (run or site id): encodable as UTF-8 (a lone surrogate is not), as hashing needs."""
    text = str(value)
    text.encode("utf-8")  # UnicodeEncodeError (a ValueError) for a lone surrogate
    return text


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def participants_hash(site_ids: list[str] | tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join(sorted(site_ids)).encode()).hexdigest()


def epsilon_hash(epsilon_micro_by_site: Mapping[str, int]) -> str:
    return hashlib.sha256(_canonical(dict(epsilon_micro_by_site))).hexdigest()


@dataclass(frozen=True)
class RoundManifest:
    run_id: str
    round_index: int
    updates: tuple[tuple[str, str], ...]  # (site id, update sha256 hex), ordered by site id
    aggregate_sha256: str
    epsilon_micro_by_site: tuple[tuple[str, int], ...]
    he_error_bound_pico: int

    @property
    def site_ids(self) -> tuple[str, ...]:
        return tuple(site for site, _ in self.updates)

    def update_root(self) -> str:
        return merkle_root(update_leaves(dict(self.updates))).hex()

    def to_bytes(self) -> bytes:
        return _canonical(
            {
                "schema": MANIFEST_SCHEMA,
                "run_id": self.run_id,
                "round_index": self.round_index,
                "updates": [{"site_id": site, "sha256": digest} for site, digest in self.updates],
                "aggregate_sha256": self.aggregate_sha256,
                "epsilon_micro_by_site": dict(self.epsilon_micro_by_site),
                "he_error_bound_pico": self.he_error_bound_pico,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundManifest:
        try:
            record = json.loads(data, parse_constant=_no_constant)
            if not isinstance(record, dict):
                raise TypeError(f"a round manifest is a JSON object, this is a {type(record).__name__}")
            if record.get("schema") != MANIFEST_SCHEMA:
                raise ValueError(f"schema is {record.get('schema')!r}, expected {MANIFEST_SCHEMA!r}")
            return cls(
                run_id=_text(record["run_id"]),
                round_index=int(record["round_index"]),
                updates=tuple((_text(item["site_id"]), _text(item["sha256"])) for item in record["updates"]),
                aggregate_sha256=str(record["aggregate_sha256"]),
                epsilon_micro_by_site=tuple(sorted((_text(k), int(v)) for k, v in record["epsilon_micro_by_site"].items())),
                he_error_bound_pico=int(record["he_error_bound_pico"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, ArithmeticError) as error:  # the coordinator's file
            raise ChainError(f"round manifest is malformed: {type(error).__name__}: {str(error)[:200]}") from None

    def anchor(self, manifest_sha256: str) -> RoundAnchor:
        epsilons = dict(self.epsilon_micro_by_site)
        return RoundAnchor(
            run_id=self.run_id,
            round_index=self.round_index,
            update_root=self.update_root(),
            aggregate_hash=self.aggregate_sha256,
            manifest_hash=manifest_sha256,
            participants_hash=participants_hash(self.site_ids),
            participant_count=len(self.updates),
            epsilon_hash=epsilon_hash(epsilons),
            max_epsilon_micro=max(epsilons.values(), default=0),
            he_error_bound_pico=self.he_error_bound_pico,
        )

    def max_epsilon(self) -> float:
        return from_micro(max(dict(self.epsilon_micro_by_site).values(), default=0))


def build_round_anchor(
    store: ArtifactStore,
    *,
    run_id: str,
    round_index: int,
    update_digests: Mapping[str, str],
    aggregate_digest: str,
    epsilon_by_site: Mapping[str, float],
    he_error_bound: float,
) -> tuple[RoundAnchor, RoundManifest]:
    """Write the round manifest to `store` and return the anchor to send with DataChain.anchor_round.

    `update_digests` maps each accepted site to the sha256 of its update as already stored in
    `store`; `epsilon_by_site` is each participant's cumulative epsilon spent ({} without DP).
    """
    if not update_digests:
        raise ChainError(f"round {round_index} of run {run_id!r} has no accepted update; nothing to anchor")
    missing = [digest for digest in [*update_digests.values(), aggregate_digest] if not store.exists(digest)]
    if missing:
        raise ArtifactNotFoundError(missing[0], store.path(missing[0]))
    if epsilon_by_site and set(epsilon_by_site) != set(update_digests):
        raise ChainError(
            f"epsilon_by_site covers {sorted(epsilon_by_site)} but the accepted sites are {sorted(update_digests)}; "
            "report epsilon for exactly the accepted sites (or {} when DP is off)"
        )
    manifest = RoundManifest(
        run_id=run_id,
        round_index=round_index,
        updates=tuple((site, update_digests[site].lower().removeprefix("0x")) for site in sorted(update_digests)),
        aggregate_sha256=aggregate_digest.lower().removeprefix("0x"),
        epsilon_micro_by_site=tuple(sorted((site, to_micro(eps)) for site, eps in epsilon_by_site.items())),
        he_error_bound_pico=to_pico(he_error_bound),
    )
    manifest_sha256 = store.put(manifest.to_bytes(), kind=MANIFEST_KIND)
    return manifest.anchor(manifest_sha256), manifest
