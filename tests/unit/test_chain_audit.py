"""Audit on the embedded EVM: verify recomputes roots from stored artifacts; lineage and access read back."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from rich.console import Console

from medtwin.chain import (
    ChainRevertError,
    ChainSession,
    Decision,
    RunRegistration,
    access_table,
    audit_access,
    audit_lineage,
    audit_verify,
    build_round_anchor,
    lineage_table,
    open_session,
    run_key,
    verify_table,
)
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config.chain import ChainConfig

SITES = ("hosp-a", "hosp-b", "hosp-c")
RUN = "run-audit"


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture()
def federation(tmp_path: Path) -> tuple[ChainSession, ArtifactStore, dict[tuple[int, str], str]]:
    return anchored_federation(ArtifactStore(tmp_path / "artifacts"))


def anchored_federation(store: ArtifactStore) -> tuple[ChainSession, ArtifactStore, dict[tuple[int, str], str]]:
    """Three sites, three rounds, all anchored, with their updates in `store`; (session, store, (round, site) -> update)."""
    session = open_session(ChainConfig(name="embedded"))
    for site_id in SITES:
        account = session.site_account(site_id)
        session.auth.register_site(site_id=site_id, address=account.address, key_fingerprint=h(f"key {site_id}"))
        session.auth.approve_run(site=account, run_id=RUN, config_hash=h("config"), code_hash=h("code"))
    session.data.register_run(RunRegistration(RUN, "breast_cancer", h("config"), h("code"), h("dp"), h("he")))
    session.data.commit_datasets(run_id=RUN, manifests={site: h(f"dataset {site}") for site in SITES})
    updates: dict[tuple[int, str], str] = {}
    previous_model = ""
    for round_index in (1, 2, 3):
        digests = {site: store.put(f"{site} round {round_index} update".encode(), kind="update") for site in SITES}
        updates.update({(round_index, site): digest for site, digest in digests.items()})
        aggregate = store.put(f"aggregate {round_index}".encode(), kind="aggregate")
        session.auth.record_decisions(
            [Decision("admit_update", True, "ok", site_id=site, subject=digest) for site, digest in digests.items()],
            run_id=RUN, round_index=round_index,
        )
        anchor, _ = build_round_anchor(
            store, run_id=RUN, round_index=round_index, update_digests=digests, aggregate_digest=aggregate,
            epsilon_by_site={site: 0.5 * round_index for site in SITES}, he_error_bound=3e-8,
        )
        assert session.data.anchor_round(anchor).mined
        session.data.record_lineage(model_hash=aggregate, parent_hash=previous_model, run_id=RUN, round_index=round_index)
        previous_model = aggregate
    return session, store, updates


def test_verify_passes_on_an_intact_store(federation) -> None:
    session, store, _ = federation
    report = audit_verify(session, store, RUN)
    assert report.ok, report.mismatches
    assert report.rounds_checked == 3
    assert report.artifacts_checked == 3 * (1 + len(SITES) + 1) + 3  # manifest, updates, aggregate; models
    assert json.loads(report.to_json())["ok"] is True


def test_altering_one_byte_of_one_update_is_reported_for_that_round_only(federation) -> None:
    session, store, updates = federation
    path = store.path(updates[(2, "hosp-b")])
    data = bytearray(path.read_bytes())
    data[3] ^= 0x20
    path.write_bytes(bytes(data))
    report = audit_verify(session, store, RUN)
    assert not report.ok
    assert {(m.round_index, m.kind) for m in report.mismatches} == {(2, "update"), (2, "merkle_root")}
    assert any("hosp-b" in m.detail for m in report.mismatches)
    Console(width=200, record=True).print(verify_table(report))


def test_verify_reports_a_missing_artifact_and_a_tampered_manifest(federation) -> None:
    session, store, updates = federation
    store.path(updates[(1, "hosp-a")]).unlink()
    manifest_hash = session.data.anchor(RUN, 3).manifest_hash
    store.path(manifest_hash).write_bytes(store.path(manifest_hash).read_bytes().replace(b"hosp-c", b"hosp-x"))
    kinds = {(m.round_index, m.kind) for m in audit_verify(session, store, RUN).mismatches}
    assert (1, "update") in kinds and (1, "merkle_root") in kinds
    assert (3, "manifest") in kinds


@pytest.mark.parametrize(
    "replacement",
    [b"[]", b'"x"', b"5", b"[" * 20_000 + b"]" * 20_000, b'{"schema": "medtwin.round-manifest/1", "updates": [[1]], "epsilon_micro_by_site": []}'],
    ids=["list", "string", "number", "nested 20k deep", "fields of the wrong type"],
)
def test_a_manifest_replaced_by_any_json_is_reported_not_a_crash(federation, replacement: bytes) -> None:
    """The manifests are the coordinator's files: a hostile one must not make the auditor's verify crash."""
    session, store, _ = federation
    store.path(session.data.anchor(RUN, 2).manifest_hash).write_bytes(replacement)
    report = audit_verify(session, store, RUN)
    assert not report.ok and {(m.round_index, m.kind) for m in report.mismatches} >= {(2, "manifest")}
    assert {m.round_index for m in report.mismatches} == {2}  # rounds 1 and 3 still verified


def test_verify_of_an_unknown_run_fails(federation) -> None:
    session, store, _ = federation
    report = audit_verify(session, store, "no-such-run")
    assert not report.ok and report.mismatches[0].kind == "run"


def test_lineage_lists_rounds_sites_approvals_epsilon_datasets_and_models(federation) -> None:
    session, store, updates = federation
    report = audit_lineage(session, store, RUN)
    assert report.problems == ()
    assert [r.round_index for r in report.rounds] == [1, 2, 3]
    last = report.rounds[-1]
    assert [p.site_id for p in last.participants] == list(SITES)
    assert all(p.approval_valid_then and p.admitted_at > 0 for p in last.participants)
    assert last.max_epsilon == pytest.approx(1.5) and last.he_error_bound == pytest.approx(3e-8)
    assert last.participants[0].update_sha256 == updates[(3, "hosp-a")]
    assert {d.site_id for d in report.datasets} == set(SITES)
    assert len(report.models) == 3
    by_model = audit_lineage(session, store, report.models[-1].model_hash)
    assert by_model.run is not None and by_model.run.run_id == RUN
    assert [m.round_index for m in by_model.models] == [3, 2, 1]
    Console(width=200, record=True).print(lineage_table(report))


def test_lineage_flags_a_participant_whose_site_was_revoked(federation) -> None:
    session, store, _ = federation
    session.auth.revoke_site(site_id="hosp-c", reason="withdrawn")
    digest = store.put(b"late update", kind="update")
    aggregate = store.put(b"late aggregate", kind="aggregate")
    session.auth.record_decisions([Decision("admit_update", True, "ok", site_id="hosp-c")], run_id=RUN, round_index=4)
    anchor, _ = build_round_anchor(
        store, run_id=RUN, round_index=4, update_digests={"hosp-c": digest}, aggregate_digest=aggregate,
        epsilon_by_site={}, he_error_bound=0.0,
    )
    session.data.anchor_round(anchor)
    report = audit_lineage(session, store, RUN)
    assert not report.rounds[-1].participants[0].approval_valid_then
    assert any("round 4" in problem and "hosp-c" in problem for problem in report.problems)


def test_access_report_filters_by_site(federation) -> None:
    session, _, _ = federation
    report = audit_access(session, site_id="hosp-b")
    assert [(d.round_index, d.action, d.site_id) for d in report.decisions] == [(r, "admit_update", "hosp-b") for r in (1, 2, 3)]
    kinds = {event.kind for event in report.governance}
    assert {"SiteRegistered", "RunApproved"} <= kinds
    assert json.loads(report.to_json())["site_id"] == "hosp-b"
    Console(width=200, record=True).print(access_table(report))


def test_verify_checks_completeness_against_the_registered_plan(tmp_path: Path) -> None:
    """A run planned for 4 rounds that stopped after round 2 (or whose later anchors never landed) is not OK:
    each missing round and the missing final lineage is named. The plan is read from the run's config.yaml
    only because it hashes to the config hash registered on chain; a doctored one is reported instead."""
    from medtwin.core.hashing import config_hash

    session = open_session(ChainConfig(name="embedded"))
    run_folder = tmp_path / "runs" / "stopped"
    store = ArtifactStore(run_folder / "artifacts")
    config_text = "federation:\n  num_rounds: 4\ntask:\n  name: breast_cancer\n"
    run_folder.mkdir(parents=True)
    (run_folder / "config.yaml").write_text(config_text)
    session.data.register_run(RunRegistration("stopped", "breast_cancer", config_hash(config_text), h("code"), h("dp"), h("he")))
    for round_index in (1, 2):
        digests = {site: store.put(f"{site} {round_index}".encode(), kind="update") for site in SITES}
        anchor, _ = build_round_anchor(
            store, run_id="stopped", round_index=round_index, update_digests=digests,
            aggregate_digest=store.put(f"aggregate {round_index}".encode(), kind="aggregate"),
            epsilon_by_site={site: 0.1 for site in SITES}, he_error_bound=0.0,
        )  # fmt: skip
        assert session.data.anchor_round(anchor).mined
        if round_index == 1:  # round 2's decision batch never reached the authorization chain
            session.auth.record_decisions(
                [Decision("admit_update", True, "ok", site_id=site, subject=digest) for site, digest in digests.items()],
                run_id="stopped", round_index=1,
            )  # fmt: skip
    report = audit_verify(session, store, "stopped")
    assert not report.ok
    assert {(m.round_index, m.kind) for m in report.mismatches} == {(2, "decisions"), (3, "round"), (2, "model")}
    details = " ".join(m.detail for m in report.mismatches)
    assert "rounds 3..4 of 4 planned not anchored" in details
    assert "round 2 aggregated 3 update(s) but the authorization chain records no admission of 3 of them" in details
    assert report.completeness.startswith("checked against the registered plan (4 rounds)")
    wrong = [Decision("admit_update", True, "ok", site_id=site, subject=h(f"not {site}")) for site in SITES]  # not these updates
    session.auth.record_decisions(wrong, run_id="stopped", round_index=2)
    report = audit_verify(session, store, "stopped")
    assert (2, "decisions") in {(m.round_index, m.kind) for m in report.mismatches}  # admissions must name the updates
    session.auth.record_decisions(
        [Decision("admit_update", True, "ok", site_id=site, subject=digest) for site, digest in digests.items()],
        run_id="stopped", round_index=2, batch_label="right",
    )  # fmt: skip

    (run_folder / "config.yaml").write_text(config_text.replace("num_rounds: 4", "num_rounds: 2"))  # doctored plan
    report = audit_verify(session, store, "stopped")
    assert [(m.round_index, m.kind) for m in report.mismatches] == [(0, "run")]
    assert report.completeness.startswith("not checked")
    (run_folder / "config.yaml").unlink()  # no plan to check against: verify says so instead of staying silent
    report = audit_verify(session, store, "stopped")
    assert report.ok and report.completeness.startswith("not checked")
    store.put(config_text.replace("num_rounds: 4", "num_rounds: 3").encode(), kind="config")  # a config that did not run
    assert audit_verify(session, store, "stopped").completeness.startswith("not checked")
    store.put(config_text.encode(), kind="config")  # an auditor with only the artifact store finds the registered plan
    report = audit_verify(session, store, "stopped")
    assert (3, "round") in {(m.round_index, m.kind) for m in report.mismatches}
    assert report.completeness.startswith("checked against the registered plan (4 rounds)")


def test_two_runs_that_produce_the_same_model_both_record_it_and_lineage_lists_both(tmp_path: Path) -> None:
    """A reproducibility check re-runs the same config and seed: deterministic training gives the same final
    model hash. Lineage is per (model, run): the second run records its origin too, once; audit lineage of
    the model names both runs."""
    session = open_session(ChainConfig(name="embedded"))
    store = ArtifactStore(tmp_path / "artifacts")
    model = h("the same final model")
    for run_id in ("run-a", "run-b"):
        session.data.register_run(RunRegistration(run_id, "breast_cancer", h("config"), h("code"), h("dp"), h("he")))
        assert session.data.record_lineage(model_hash=model, run_id=run_id, round_index=3).mined
    with pytest.raises(ChainRevertError, match="already recorded for this run"):
        session.data.record_lineage(model_hash=model, run_id="run-b", round_index=3)
    assert [record.round_index for record in session.data.models_of_run("run-a")] == [3]
    assert session.data.origin(model, "run-b") is not None
    assert session.data.is_applied("record_lineage", [bytes.fromhex(model), bytes(32), run_key("run-b"), 3], "")
    assert not session.data.is_applied("record_lineage", [bytes.fromhex(model), bytes(32), run_key("run-c"), 3], "")
    assert audit_lineage(session, store, model).origins == ("run-a", "run-b")
