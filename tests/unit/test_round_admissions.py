"""The coordinator reads a round's admissions together (`RoundLoop.round_admissions`) and still refuses per site.

The scripted Grid of test_hostile_site: node 1 is honest alpha, node 2 honest beta or a hostile variant. The
recording provenance below answers from a registry it holds and logs every read, batched or single.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from test_hostile_site import (  # tests/unit is on sys.path (rootdir-relative imports)
    MANIFEST,
    NODES,
    RUN_ID,
    ScriptedGrid,
    honest,
    impersonation,
    serverapp_identity,  # noqa: F401 — autouse: Flower's ServerApp identity for building messages
)

from medtwin.core.artifacts import ArtifactStore
from medtwin.server.aggregation import PlainAggregator
from medtwin.server.loop import RoundLoop

NUM_ROUNDS = 2


class BatchReadingProvenance:
    """Admits the sites in `admitted`; `batch_answers_only` limits what a batched read answers (the rest: asked singly)."""

    def __init__(self, admitted: set[str], *, batch_answers_only: set[str] | None = None) -> None:
        self.admitted = admitted
        self.batch_answers_only = batch_answers_only
        self.batches: list[list[str]] = []
        self.singles: list[str] = []
        self.rounds: list[dict[str, Any]] = []

    def _answer(self, site_id: str) -> str | None:
        return None if site_id in self.admitted else f"{site_id} is revoked on the authorization chain"

    def admission_problem(self, *, site_id: str, run_id: str) -> str | None:
        self.singles.append(site_id)
        return self._answer(site_id)

    def admission_problems(self, *, site_ids: list[str], run_id: str) -> dict[str, str | None]:
        assert run_id == RUN_ID
        self.batches.append(sorted(site_ids))
        answered = [site for site in site_ids if self.batch_answers_only is None or site in self.batch_answers_only]
        return {site_id: self._answer(site_id) for site_id in answered}

    def close_round(self, **values: Any) -> dict[str, Any]:
        self.rounds.append(values)
        return {}


def _run(default_config, tmp_path: Path, provenance: BatchReadingProvenance, beta=honest) -> RoundLoop:
    config = replace(
        default_config,
        task=replace(default_config.task, num_sites=len(NODES)),
        federation=replace(default_config.federation, num_rounds=NUM_ROUNDS, min_sites=1, evaluate_every=1, round_timeout_s=1.0),
    )
    loop = RoundLoop(
        grid=ScriptedGrid(lambda message, hostile: beta(message, "beta") if beta is honest else beta(message, hostile)),  # type: ignore[arg-type]
        config=config, run_id=RUN_ID, aggregator=PlainAggregator(), manifest=MANIFEST,
        artifacts=ArtifactStore(tmp_path / "artifacts"), on_record=lambda record: None,
        provenance=provenance,  # type: ignore[arg-type]
        task_kind="binary",
    )  # fmt: skip
    assert loop.run().rounds_completed == NUM_ROUNDS
    return loop


def _denials(provenance: BatchReadingProvenance) -> list[tuple[int, str, str]]:
    return [
        (values["server_round"], decision.site_id, decision.code)
        for values in provenance.rounds for decision in values["decisions"] if not decision.granted
    ]  # fmt: skip


def test_a_round_reads_every_site_admission_in_one_batch_and_refuses_the_revoked_site(default_config, tmp_path: Path) -> None:
    provenance = BatchReadingProvenance(admitted={"alpha"})
    loop = _run(default_config, tmp_path, provenance)
    assert provenance.batches == [["alpha", "beta"]] * NUM_ROUNDS and provenance.singles == []  # read fresh, once per round
    assert _denials(provenance) == [(r, "beta", "not_admitted") for r in range(1, NUM_ROUNDS + 1)]
    assert all(rejection.code == "not_admitted" and "revoked" in rejection.reason for rejection in loop.result.rejections)


def test_a_verified_site_the_batch_did_not_answer_is_asked_on_its_own(default_config, tmp_path: Path) -> None:
    provenance = BatchReadingProvenance(admitted={"alpha"}, batch_answers_only={"alpha"})
    _run(default_config, tmp_path, provenance)
    assert provenance.singles == ["beta"] * NUM_ROUNDS  # never admitted on a missing answer
    assert _denials(provenance) == [(r, "beta", "not_admitted") for r in range(1, NUM_ROUNDS + 1)]


def test_a_claim_naming_another_site_only_chooses_what_is_read(default_config, tmp_path: Path) -> None:
    provenance = BatchReadingProvenance(admitted={"alpha", "beta"})
    _run(default_config, tmp_path, provenance, beta=impersonation)  # beta's key signs a claim naming alpha
    assert provenance.batches == [["alpha"]] * NUM_ROUNDS and provenance.singles == []
    assert [code for _, _, code in _denials(provenance)] == ["bad_signature"] * NUM_ROUNDS
