"""Round checkpoints: what the coordinator needs to continue a run after it stopped (Flower keeps none).

After every phase that closes a round's work (training, then evaluation when the round has one),
the loop writes `checkpoints/round-<NNNNN>.json` atomically. The aggregate itself is not in the
file: it is already in the run's content-addressed artifact store, named by `aggregate_sha256`.

File layout (canonical JSON = sorted keys, no spaces; the checksum covers `checkpoint` exactly):

    {"checksum": "sha256:<hex of canonical JSON of checkpoint>",
     "checkpoint": {"format": 1, "run_id": "...", "config_sha256": "...", "server_round": 3,
                    "phase": "evaluate", "aggregate_sha256": "...", "certificate": {...},
                    "rounds_completed": 3, "rejections": [...], ...}}

    save_checkpoint(run_dir.checkpoints, checkpoint)
    latest = load_latest_checkpoint(run_dir.checkpoints)  # None if the run has none yet
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from medtwin.core.errors import MedtwinError
from medtwin.core.identity import SignatureError
from medtwin.core.protocol import RoundCertificate
from medtwin.core.rundir import atomic_write_bytes

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "RoundCheckpoint",
    "checkpoint_path",
    "load_checkpoint",
    "load_latest_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"^round-(\d{5,})\.json$")
PHASES = ("train", "evaluate")


class CheckpointError(MedtwinError):
    """A checkpoint is missing, corrupted, or does not belong to the run being resumed."""


def _canonical(payload: object) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _checksum(payload: object) -> str:
    return "sha256:" + hashlib.sha256(_canonical(payload)).hexdigest()


@dataclass(frozen=True)
class RoundCheckpoint:
    """The coordinator's state after `phase` of round `server_round` closed.

    `phase` is "evaluate" once the round is complete, "train" when its evaluation is still to run
    (`evaluation_pending`). Lists and maps are the loop's running totals over the whole run.
    """

    run_id: str
    config_sha256: str
    server_round: int
    phase: str
    aggregate_sha256: str
    certificate: RoundCertificate
    evaluation_pending: bool = False
    rounds_completed: int = 0
    rejections: tuple[dict[str, Any], ...] = ()  # {"site_id", "node_id", "reason", "server_round", "code"}
    update_bytes: int = 0
    accepted_updates: int = 0
    round_times_s: tuple[float, ...] = ()
    open_round_time_s: float = 0.0  # time already spent in a round whose evaluation is pending
    aggregate_digests: tuple[str, ...] = ()
    he_error_bounds: tuple[float, ...] = ()
    num_parameters: int = 0
    privacy: dict[str, dict[str, float]] = field(default_factory=dict)
    final_site_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    final_pooled_metrics: dict[str, float] = field(default_factory=dict)
    final_score_histogram: dict[str, tuple] | None = None  # ScoreHistogram fields of the last evaluation's pooled histogram
    sites: dict[int, str] = field(default_factory=dict)  # node id -> verified site id
    accepted_payloads: dict[str, tuple[int, str]] = field(default_factory=dict)  # update digest -> (round, site)
    # task.normalization=federated: the round-0 statistics sum (in the artifact store) and its certificate,
    # so a resumed run sends the very statistics every site already normalised with
    statistics_aggregate_sha256: str = ""
    statistics_certificate: RoundCertificate | None = None
    # the loop's deadline memory, so a resumed coordinator does not wait a deadline again for a node that missed
    # one (a SIGKILLed SuperNode stays listed for ~45-60 s): node id -> round it last missed, and those of them
    # the SuperLink stopped listing since (listed again = back)
    unresponsive: dict[int, int] = field(default_factory=dict)
    dropped: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        values = {item.name: getattr(self, item.name) for item in fields(self)}
        values["statistics_certificate"] = _certificate_values(self.statistics_certificate)
        certificate = self.certificate.to_record()
        values |= {
            "format": CHECKPOINT_FORMAT,
            "certificate": {
                "round": certificate["round"],
                "aggregate_sha256": certificate["aggregate_sha256"],
                "claims": certificate["claims"],
            },
            "rejections": [dict(rejection) for rejection in self.rejections],
            "round_times_s": list(self.round_times_s),
            "aggregate_digests": list(self.aggregate_digests),
            "he_error_bounds": list(self.he_error_bounds),
            "sites": {str(node_id): site for node_id, site in self.sites.items()},
            "accepted_payloads": {digest: [server_round, site] for digest, (server_round, site) in self.accepted_payloads.items()},
            "unresponsive": {str(node_id): missed_in for node_id, missed_in in self.unresponsive.items()},
            "dropped": sorted(self.dropped),
        }
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "checkpoint") -> RoundCheckpoint:
        """Parse a checkpoint body; raises `CheckpointError` naming `source` on anything malformed."""
        try:
            if values.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {values.get('format')!r}, this coordinator reads format {CHECKPOINT_FORMAT}")
            certificate = RoundCertificate.from_record(values["certificate"])
            checkpoint = cls(
                run_id=str(values["run_id"]),
                config_sha256=str(values["config_sha256"]),
                server_round=_count(values["server_round"], "server_round"),
                phase=str(values["phase"]),
                aggregate_sha256=str(values["aggregate_sha256"]),
                certificate=certificate,
                evaluation_pending=bool(values["evaluation_pending"]),
                rounds_completed=_count(values["rounds_completed"], "rounds_completed"),
                rejections=tuple(dict(rejection) for rejection in values["rejections"]),
                update_bytes=_count(values["update_bytes"], "update_bytes"),
                accepted_updates=_count(values["accepted_updates"], "accepted_updates"),
                round_times_s=tuple(float(value) for value in values["round_times_s"]),
                open_round_time_s=float(values["open_round_time_s"]),
                aggregate_digests=tuple(str(digest) for digest in values["aggregate_digests"]),
                he_error_bounds=tuple(float(value) for value in values["he_error_bounds"]),
                num_parameters=_count(values["num_parameters"], "num_parameters"),
                privacy={str(site): {str(k): float(v) for k, v in spent.items()} for site, spent in values["privacy"].items()},
                final_site_metrics={
                    str(site): {str(k): float(v) for k, v in metrics.items()} for site, metrics in values["final_site_metrics"].items()
                },
                final_pooled_metrics={str(k): float(v) for k, v in values["final_pooled_metrics"].items()},
                final_score_histogram=_score_histogram(values.get("final_score_histogram")),
                sites={int(node_id): str(site) for node_id, site in values["sites"].items()},
                accepted_payloads={
                    str(digest): (int(server_round), str(site)) for digest, (server_round, site) in values["accepted_payloads"].items()
                },
                statistics_aggregate_sha256=str(values.get("statistics_aggregate_sha256", "")),
                statistics_certificate=(
                    RoundCertificate.from_record(values["statistics_certificate"]) if values.get("statistics_certificate") else None
                ),
                # absent from checkpoints written before they were kept: nothing remembered, as before
                unresponsive={
                    _node_id(node_id): _count(missed_in, "unresponsive round")
                    for node_id, missed_in in _typed(values.get("unresponsive", {}), dict, "unresponsive").items()
                },
                dropped=tuple(_node_id(node_id) for node_id in _typed(values.get("dropped", []), list, "dropped")),
            )
        except (KeyError, TypeError, ValueError, AttributeError, SignatureError) as error:
            raise CheckpointError(
                f"{source} is not a readable round checkpoint ({type(error).__name__}: {error!s:.200}) — "
                "it was not written by this coordinator version, or was edited; delete it to resume from the previous one"
            ) from None
        checkpoint.check_consistent(source=source)
        return checkpoint

    def check_consistent(self, *, source: str = "checkpoint") -> None:
        """Raise `CheckpointError` if the fields contradict each other (a checkpoint can only describe one state)."""
        problems = []
        if self.phase not in PHASES:
            problems.append(f"phase {self.phase!r} is not one of {PHASES}")
        if self.server_round < 1:
            problems.append(f"server_round is {self.server_round}, must be >= 1")
        if self.certificate.server_round != self.server_round:
            problems.append(f"the certificate is for round {self.certificate.server_round}, the checkpoint for round {self.server_round}")
        if self.certificate.aggregate_sha256 != self.aggregate_sha256:
            problems.append("the certificate names another aggregate than the checkpoint")
        if len(self.aggregate_digests) != self.server_round or (self.aggregate_digests and self.aggregate_digests[-1] != self.aggregate_sha256):
            problems.append(f"{len(self.aggregate_digests)} aggregate digest(s) recorded for {self.server_round} round(s)")
        statistics = self.statistics_certificate
        if (statistics is None) != (not self.statistics_aggregate_sha256) or (
            statistics is not None and (statistics.server_round != 0 or statistics.aggregate_sha256 != self.statistics_aggregate_sha256)
        ):
            problems.append("the statistics certificate and the statistics aggregate do not match")
        if self.evaluation_pending and self.phase != "train":
            problems.append("an evaluation is pending after the evaluation phase")
        if any(missed_in > self.server_round for missed_in in self.unresponsive.values()):
            problems.append(f"a node missed a deadline in a round after round {self.server_round}")
        if not set(self.dropped) <= set(self.unresponsive):
            problems.append("a dropped node is not among the nodes that missed a deadline")
        if not all(math.isfinite(value) for value in (*self.round_times_s, *self.he_error_bounds, self.open_round_time_s)):
            problems.append("a time or error bound is not a finite number")
        if problems:
            raise CheckpointError(f"{source} is inconsistent: " + "; ".join(problems) + " — delete it to resume from the previous one")

    @property
    def next_round(self) -> int:
        """The first round a resumed loop trains."""
        return self.server_round + 1


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} is {value!r}, not a non-negative integer")
    return value


def _typed(value: Any, kind: type, name: str) -> Any:
    if not isinstance(value, kind):
        raise ValueError(f"{name} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def _node_id(value: object) -> int:
    """A Flower node id (an unsigned 64-bit integer), written as a JSON key (str, in its one decimal form) or value (int)."""
    if isinstance(value, str) and re.fullmatch(r"0|[1-9][0-9]*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise ValueError(f"node id {value!r} is not an unsigned 64-bit integer")
    return value


def checkpoint_path(folder: Path | str, server_round: int) -> Path:
    return Path(folder) / f"round-{server_round:05d}.json"


def save_checkpoint(folder: Path | str, checkpoint: RoundCheckpoint) -> Path:
    """Write `checkpoint` atomically as `<folder>/round-<NNNNN>.json` (a later phase of the round replaces it)."""
    checkpoint.check_consistent()
    body = checkpoint.to_dict()
    text = json.dumps({"checksum": _checksum(body), "checkpoint": body}, sort_keys=True, indent=1, allow_nan=False) + "\n"
    path = checkpoint_path(folder, checkpoint.server_round)
    atomic_write_bytes(path, text.encode("utf-8"), mode=0o600)
    return path


def load_checkpoint(path: Path | str) -> RoundCheckpoint:
    """Read one checkpoint file; raises `CheckpointError` if it is unreadable or its checksum does not match."""
    path = Path(path)
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        body, checksum = stored["checkpoint"], stored["checksum"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:  # RecursionError: nested absurdly deep
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(error).__name__}: {error!s:.200}) — "
            "delete it to resume from the previous checkpoint"
        ) from None
    try:
        actual = _checksum(body)
    except (TypeError, ValueError, RecursionError):
        actual = "not canonical JSON"
    if actual != checksum:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: its checksum is {checksum!r:.80}, its content hashes to {actual} — "
            "delete it to resume from the previous checkpoint"
        )
    checkpoint = RoundCheckpoint.from_dict(body, source=f"checkpoint {path}")
    if checkpoint_path(path.parent, checkpoint.server_round).name != path.name:
        raise CheckpointError(f"checkpoint {path} holds round {checkpoint.server_round}: the file was renamed; restore its name")
    return checkpoint


def load_latest_checkpoint(folder: Path | str) -> RoundCheckpoint | None:
    """The checkpoint of the highest round in `folder`, or None if there is none.

    A corrupted latest checkpoint raises `CheckpointError` rather than silently falling back to an
    older one: resuming from an older round would ask sites to train a round they already trained.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    rounds = sorted(
        (int(match.group(1)), path) for path in folder.iterdir() if (match := _NAME.match(path.name)) is not None
    )
    if not rounds:
        return None
    return load_checkpoint(rounds[-1][1])


def _score_histogram(values: Any) -> dict[str, tuple] | None:
    """The pooled score histogram a checkpoint kept (absent in checkpoints written before histograms)."""
    if values is None:
        return None
    histogram = {
        "negatives": tuple(int(count) for count in values["negatives"]),
        "positives": tuple(int(count) for count in values["positives"]),
        "score_sums": tuple(float(total) for total in values["score_sums"]),
    }
    if len({len(column) for column in histogram.values()}) != 1:
        raise ValueError("final_score_histogram columns differ in length")
    return histogram


def _certificate_values(certificate: RoundCertificate | None) -> dict[str, Any] | None:
    if certificate is None:
        return None
    record = certificate.to_record()
    return {"round": record["round"], "aggregate_sha256": record["aggregate_sha256"], "claims": record["claims"]}
