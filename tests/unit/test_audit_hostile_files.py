"""The auditor reads the coordinator's files (artifact store, its index, config.yaml): whatever is in them is
REPORTED as a mismatch or problem, never a crash, and never hides an incomplete run."""

from __future__ import annotations

import hashlib
import json
import textwrap
import sys
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from medtwin.chain import (
    Decision,
    RunRegistration,
    access_table,
    audit_access,
    audit_lineage,
    audit_verify,
    build_round_anchor,
    lineage_table,
    open_session,
    verify_table,
)
from medtwin.chain.anchoring import RoundManifest
from medtwin.chain.records import RoundAnchor
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config.chain import ChainConfig
from medtwin.core.hashing import config_hash
from medtwin.core.merkle import merkle_root, update_leaves

from test_chain_audit import RUN, SITES, anchored_federation, h  # tests/unit is on sys.path (rootdir-relative imports)

def render(table) -> str:
    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    return console.export_text()


@pytest.fixture()
def fed(tmp_path: Path):
    """test_chain_audit's anchored federation, its store where a run directory keeps it (config.yaml beside it);
    (session, store, round 2's update of hosp-b, aggregate and manifest files)."""
    session, store, updates = anchored_federation(ArtifactStore(tmp_path / "runs" / RUN / "artifacts"))
    anchor = session.data.anchor(RUN, 2)
    paths = {"update": store.path(updates[(2, "hosp-b")]), "aggregate": store.path(anchor.aggregate_hash), "manifest": store.path(anchor.manifest_hash)}
    assert audit_verify(session, store, RUN).ok
    return session, store, paths


def _replace(path: Path, how: str) -> None:
    path.unlink()
    path.symlink_to(how)


# --- index.jsonl (read by _registered_config -> ArtifactStore.kinds) -------------------------------------------

@pytest.mark.parametrize(
    "content",
    [b"not json\n", b"[]\n", b'"x"\n', b"{}\n", b'{"sha256": [1], "kind": "config"}\n', b"[" * 20_000 + b"]" * 20_000 + b"\n", b"\xff\xfe\n"],
    ids=["non-json", "list", "string", "missing-keys", "unhashable", "nested-20k", "non-utf8"],
)
def test_hostile_index_is_reported_not_a_crash(fed, content: bytes) -> None:
    session, store, _ = fed
    (store.root / "index.jsonl").write_bytes(content)
    report = audit_verify(session, store, RUN)
    assert any("index" in m.detail for m in report.mismatches), report.mismatches


def test_index_symlinked_to_an_unreadable_proc_file_is_reported(fed) -> None:
    session, store, _ = fed
    _replace(store.root / "index.jsonl", "/proc/self/mem")
    report = audit_verify(session, store, RUN)
    assert any("index" in m.detail for m in report.mismatches)


# --- config.yaml beside the store (_planned_rounds) -----------------------------------------------------------

@pytest.mark.parametrize("how", ["non-utf8", "/proc/self/mem", "/proc/self/pagemap"])
def test_hostile_config_yaml_is_reported_not_a_crash(fed, how: str) -> None:
    session, store, _ = fed
    path = store.root.parent / "config.yaml"
    if how == "non-utf8":
        path.write_bytes(b"\xff\xfe federation: {num_rounds: 3}")
    else:
        path.symlink_to(how)
    report = audit_verify(session, store, RUN)
    assert any(m.kind == "run" and "config.yaml" in m.detail for m in report.mismatches)


@pytest.mark.parametrize("how", ["directory", "/dev/zero"])
def test_config_yaml_made_unreadable_does_not_hide_a_truncated_run(tmp_path: Path, how: str) -> None:
    """Planned 4 rounds, anchored 2: not OK. Replacing config.yaml by a directory / device must not turn it OK."""
    session = open_session(ChainConfig(name="embedded"))
    store = ArtifactStore(tmp_path / "runs" / "stopped" / "artifacts")
    text = "federation:\n  num_rounds: 4\n"
    session.data.register_run(RunRegistration("stopped", "breast_cancer", config_hash(text), h("code"), h("dp"), h("he")))
    for round_index in (1, 2):
        digests = {s: store.put(f"{s} {round_index}".encode(), kind="update") for s in SITES}
        session.auth.record_decisions(
            [Decision("admit_update", True, "ok", site_id=s, subject=d) for s, d in digests.items()], run_id="stopped", round_index=round_index
        )
        anchor, _ = build_round_anchor(
            store, run_id="stopped", round_index=round_index, update_digests=digests,
            aggregate_digest=store.put(f"agg {round_index}".encode(), kind="aggregate"), epsilon_by_site={}, he_error_bound=0.0,
        )  # fmt: skip
        session.data.anchor_round(anchor)
    path = store.root.parent / "config.yaml"
    path.write_text(text)
    assert not audit_verify(session, store, "stopped").ok
    path.unlink()
    path.mkdir() if how == "directory" else path.symlink_to(how)
    report = audit_verify(session, store, "stopped")
    assert not report.ok, f"truncated run verified OK ({report.completeness})"


# --- artifacts (update / aggregate / manifest) ---------------------------------------------------------------

@pytest.mark.parametrize("target", ["/proc/self/mem", "/proc/self/pagemap"])
@pytest.mark.parametrize("kind", ["update", "aggregate", "manifest"])
def test_artifact_symlinked_to_an_unreadable_file_is_reported(fed, kind: str, target: str) -> None:
    session, store, paths = fed
    _replace(paths[kind], target)
    report = audit_verify(session, store, RUN)
    assert (2, kind) in {(m.round_index, m.kind) for m in report.mismatches}
    if kind == "manifest":
        assert any(p.startswith("round 2") for p in audit_lineage(session, store, RUN).problems)


@pytest.mark.parametrize("field", ["he_error_bound_pico", "round_index", "epsilon"])
def test_manifest_with_infinity_is_reported_not_a_crash(fed, field: str) -> None:
    session, store, paths = fed
    record = json.loads(paths["manifest"].read_bytes())
    if field == "epsilon":
        record["epsilon_micro_by_site"]["hosp-a"] = float("inf")
    else:
        record[field] = float("inf")
    paths["manifest"].write_text(json.dumps(record))  # json writes Infinity, json.loads reads it back
    report = audit_verify(session, store, RUN)
    assert (2, "manifest") in {(m.round_index, m.kind) for m in report.mismatches}


def test_manifest_with_a_lone_surrogate_site_id_is_reported_not_a_crash(fed) -> None:
    session, store, paths = fed
    record = json.loads(paths["manifest"].read_bytes())
    record["updates"][0]["site_id"] = "\ud800"
    paths["manifest"].write_text(json.dumps(record))
    report = audit_verify(session, store, RUN)
    assert {m.round_index for m in report.mismatches} == {2}


def test_anchored_manifest_with_a_surrogate_site_id_does_not_crash_verify_or_lineage(fed) -> None:
    """A hostile coordinator anchors what it likes: its own manifest, hashed correctly, with an unencodable site id."""
    session, store, _ = fed
    update, aggregate = store.put(b"evil update", kind="update"), store.put(b"agg 4", kind="aggregate")
    manifest_hash = store.put(RoundManifest(RUN, 4, (("\ud800", update),), aggregate, (), 0).to_bytes(), kind="manifest")
    anchor = RoundAnchor(
        RUN, 4, merkle_root(update_leaves({"x": update})).hex(), aggregate, manifest_hash,
        hashlib.sha256("\ud800".encode("utf-8", "surrogatepass")).hexdigest(), 1, hashlib.sha256(b"{}").hexdigest(), 0, 0,
    )  # fmt: skip
    assert session.data.anchor_round(anchor).mined
    assert not audit_verify(session, store, RUN).ok
    assert any("round 4" in p for p in audit_lineage(session, store, RUN).problems)


# --- tables: what the coordinator wrote is printed as text, never read as rich markup ---------------------------

def test_markup_in_a_tampered_manifest_does_not_crash_verify_table(fed) -> None:
    session, store, paths = fed
    record = json.loads(paths["manifest"].read_bytes())
    record["run_id"] = "[/x]"
    paths["manifest"].write_text(json.dumps(record))
    assert "[/x]" in render(verify_table(audit_verify(session, store, RUN)))


def test_markup_in_an_anchored_site_id_does_not_crash_lineage_or_verify_tables(fed) -> None:
    session, store, _ = fed
    anchor, _ = build_round_anchor(
        store, run_id=RUN, round_index=4, update_digests={"[/x]": store.put(b"evil", kind="update")},
        aggregate_digest=store.put(b"agg 4", kind="aggregate"), epsilon_by_site={}, he_error_bound=0.0,
    )  # fmt: skip
    session.data.anchor_round(anchor)
    assert "[/x]" in render(lineage_table(audit_lineage(session, store, RUN)))
    assert "[/x]" in render(verify_table(audit_verify(session, store, RUN)))


def test_markup_in_a_recorded_decision_reason_does_not_crash_access_table(fed) -> None:
    session, _, _ = fed
    session.auth.record_decisions([Decision("admit_update", False, "[/x]", site_id="hosp-a", subject="11" * 32)], run_id=RUN, round_index=2)
    assert "[/x]" in render(access_table(audit_access(session, run_id=RUN)))


# --- the CLI's choice of artifact store -----------------------------------------------------------------------

def test_cli_verify_when_the_runs_artifacts_folder_is_gone_reports_not_a_traceback(fed, monkeypatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medtwin.experiments import cli_federation
    from medtwin.experiments.cli_admin import audit_app

    session, store, _ = fed
    monkeypatch.setattr(cli_federation, "auditor_session", lambda *args: session)
    (tmp_path / "runs" / "other-run" / "artifacts").mkdir(parents=True)
    result = CliRunner().invoke(audit_app, ["verify", RUN, "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 0 and result.exception is None, result.output  # baseline
    store.root.rename(tmp_path / "moved")
    store.root.write_text("not a folder")  # the coordinator swaps its artifacts folder for a file
    result = CliRunner().invoke(audit_app, ["verify", RUN, "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), repr(result.exception)


# --- huge artifacts: hashed in chunks, parsed only below a size cap ----------------------------------------------

def test_a_huge_sparse_update_is_reported_not_a_memory_error(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_audit_hostile_files import fed, audit_verify, RUN
        from pathlib import Path
        session, store, paths = fed.__wrapped__(Path({str(tmp_path)!r}))
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a 3 GB file cannot be read whole
        for kind, size in (("update", 3 << 30), ("manifest", 100 << 20)):  # the manifest last: without it, no updates
            paths[kind].unlink()
            with open(paths[kind], "wb") as handle:
                handle.truncate(size)  # sparse: no disk used
            report = audit_verify(session, store, RUN)
            assert (2, kind) in {{(m.round_index, m.kind) for m in report.mismatches}}, report.mismatches
        print("reported")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "reported" in done.stdout, done.stderr[-800:]
