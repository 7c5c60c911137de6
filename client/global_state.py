"""The shared state a server optimiser needs, derived by every site alone — never sent by the coordinator.

Under CKKS the coordinator cannot apply FedAdam, FedYogi or FedAvgM: it only sums ciphertexts. So each
site applies the step itself (client/server_optimizer.py) to the average it decrypted from the certified
updates, starting from state it already holds:

    S_0 = (initial seeded model, zero moments)            every site builds it identically
    S_r = server_step(S_{r-1}, average of round r's certified updates, r)

Where the state lives: in the site's own `state_dir`, `server-optimizer/<run id>/round-NNNNN.npz`, one
file per round written atomically (a crash leaves the old file or the new one), mode 0600, holding the
model, the moments and a digest of both (with the run id, the round and the optimiser settings). A file
whose digest does not match is refused as damaged, never recomputed over. Only the two newest rounds are
kept (an evaluation of round r and the training of round r+1 both need S_r, computed from S_{r-1}).

Sites that disagree refuse rather than diverge: every update claim names, in `aggregate_sha256`, the
digest of the state its site trained from (client/app.py). Before applying round r's step a site checks
that every certified update of round r was trained from one state, its own S_{r-1}; else it refuses
(`state_mismatch`). A round's step is applied once: the same round asked again with the same certified
updates gets the stored state back (a resumed coordinator), with other updates it is refused
(`state_conflict`: the coordinator showed two aggregates for one round); a step for a round older than
the site's newest state is refused (`out_of_order`).

A site that missed a round (down, or sitting out a deadline) holds no S_{r-1} for the next one: with a
stateful optimiser it refuses, signed, with `missing_state`, and the run goes on without it (as after
any refusal) — it cannot rebuild the moments from one round's updates, and it takes no state from the
coordinator. With `server_optimizer: none` (FedAvg) a round's model is its average alone: nothing is
stored or compared, and a site that missed rounds rejoins at once, as before.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medtwin.core.rundir import atomic_write_bytes

from .server_optimizer import OptimizerMoments, ServerOptimizerSettings, server_step

__all__ = ["GlobalState", "GlobalStateStore", "SharedStateRefused", "advance_global_state", "initial_global_state"]

STATE_DOMAIN = b"medtwin/global-state/v1\x00"
STATE_FOLDER = "server-optimizer"
_ROUND_FILE = re.compile(r"^round-(\d{5})\.npz$")


class SharedStateRefused(Exception):
    """The site will not apply this round's step; `code` is the short refusal label."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, eq=False)
class GlobalState:
    """The global model after round `server_round` (0: the initial model) and the optimiser's moments."""

    run_id: str
    server_round: int
    settings: ServerOptimizerSettings
    weights: np.ndarray
    moments: OptimizerMoments
    inputs_sha256: str = ""  # the certified updates whose average this round's step consumed
    previous_sha256: str = ""  # the state the step started from
    sha256: str = field(init=False, default="")

    def __post_init__(self) -> None:
        digest = hashlib.sha256(STATE_DOMAIN)
        identity = {"run_id": self.run_id, "round": self.server_round, "settings": asdict(self.settings)}
        digest.update(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode("ascii"))
        for array in (self.weights, self.moments.first, self.moments.second):
            digest.update(np.ascontiguousarray(array, dtype="<f8").tobytes())
        object.__setattr__(self, "sha256", digest.hexdigest())


def initial_global_state(*, run_id: str, settings: ServerOptimizerSettings, weights: np.ndarray) -> GlobalState:
    """S_0: the seeded initial model every site builds, with zero moments (Flower's start)."""
    weights = np.asarray(weights, dtype=np.float64).copy()
    return GlobalState(run_id=run_id, server_round=0, settings=settings, weights=weights, moments=OptimizerMoments.zeros(weights.size))


class GlobalStateStore:
    """`<state_dir>/server-optimizer/<run id>/round-NNNNN.npz`: this site's states of one run, newest two kept."""

    def __init__(self, state_dir: str | Path, run_id: str) -> None:
        self.run_id = run_id
        self.folder = Path(state_dir) / STATE_FOLDER / run_id  # run ids are checked ids (core/ids.py)

    def path(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:05d}.npz"

    def rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(match.group(1)) for item in self.folder.iterdir() if (match := _ROUND_FILE.match(item.name)))

    def load(self, server_round: int, *, settings: ServerOptimizerSettings) -> GlobalState | None:
        """The stored state of `server_round`, None if there is none; refuses a file that does not verify."""
        path = self.path(server_round)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = json.loads(bytes(stored["meta"]).decode("ascii"))
                state = GlobalState(
                    run_id=self.run_id,
                    server_round=server_round,
                    settings=settings,
                    weights=stored["weights"],
                    moments=OptimizerMoments(first=stored["first"], second=stored["second"]),
                    inputs_sha256=str(meta["inputs_sha256"]),
                    previous_sha256=str(meta["previous_sha256"]),
                )
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
            raise SharedStateRefused(
                "state_damaged", f"this site's shared optimiser state {path} cannot be read ({type(error).__name__})"
            ) from None
        if state.sha256 != meta.get("sha256"):
            raise SharedStateRefused(
                "state_damaged",
                f"this site's shared optimiser state {path} does not match its digest (damaged, or written for other "
                "optimiser settings): the site stops this run rather than train from it",
            )
        return state

    def save(self, state: GlobalState) -> None:
        """Write `state` atomically, then drop the rounds older than the one before it."""
        meta = {"inputs_sha256": state.inputs_sha256, "previous_sha256": state.previous_sha256, "sha256": state.sha256}
        buffer = io.BytesIO()
        np.savez(
            buffer,
            meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode("ascii"), dtype=np.uint8),
            weights=np.asarray(state.weights, dtype="<f8"),
            first=np.asarray(state.moments.first, dtype="<f8"),
            second=np.asarray(state.moments.second, dtype="<f8"),
        )
        atomic_write_bytes(self.path(state.server_round), buffer.getvalue(), mode=0o600)
        for old_round in self.rounds():
            if old_round < state.server_round - 1:
                self.path(old_round).unlink(missing_ok=True)


def advance_global_state(
    store: GlobalStateStore,
    *,
    initial: GlobalState,
    server_round: int,
    average: np.ndarray,
    inputs_sha256: str,
    started_from: tuple[str, ...],
) -> GlobalState:
    """S_r from this site's S_{r-1} and round r's average; `started_from` are the states the certified
    updates' claims say they were trained from. Raises `SharedStateRefused` (see the module docstring)."""
    settings = initial.settings
    if not settings.stateful:  # FedAvg: the round's model is its average, whatever came before
        weights, moments = server_step(settings, weights=initial.weights, moments=initial.moments, average=average, server_round=server_round)
        return GlobalState(initial.run_id, server_round, settings, weights, moments, inputs_sha256=inputs_sha256)
    existing = store.load(server_round, settings=settings)
    if existing is not None:
        if existing.inputs_sha256 != inputs_sha256:
            raise SharedStateRefused(
                "state_conflict",
                f"this site applied round {server_round}'s step already, to other certified updates: the coordinator "
                "showed two different aggregates for one round",
            )
        return existing
    newest = max(store.rounds(), default=0)
    if newest > server_round:
        raise SharedStateRefused(
            "out_of_order", f"this site's shared optimiser state is at round {newest}; round {server_round}'s step comes too late"
        )
    previous = initial if server_round == 1 else store.load(server_round - 1, settings=settings)
    if previous is None:
        raise SharedStateRefused(
            "missing_state",
            f"this site holds no shared {settings.name} state for round {server_round - 1} (it missed that round; its "
            f"newest is round {newest}): it cannot rebuild the optimiser's moments and sits out the rest of this run",
        )
    disagreeing = sum(1 for digest in started_from if digest != previous.sha256)
    if disagreeing or not started_from:
        raise SharedStateRefused(
            "state_mismatch",
            f"{disagreeing} of the {len(started_from)} certified updates of round {server_round} were trained from another "
            f"shared state than this site's round {server_round - 1} state: the sites disagree, so this site stops here",
        )
    weights, moments = server_step(settings, weights=previous.weights, moments=previous.moments, average=average, server_round=server_round)
    state = GlobalState(initial.run_id, server_round, settings, weights, moments, inputs_sha256=inputs_sha256, previous_sha256=previous.sha256)
    store.save(state)
    return state
