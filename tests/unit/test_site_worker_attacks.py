"""Attacks on the site's warm ClientApp worker (experiments/site_worker.py): what one message, or the
hospital's own changes, leave behind in a process that serves many messages.

- a Site cached by (site file, proposal) must not outlive the kit or data it was built from: a kit
  that now lists fewer federation members (a removed, compromised site) must be what the next message
  checks certificates against, as it was when each message ran in a fresh process;
- the coordinator chooses the proposal text: each distinct text caches a whole Site (data, kit, secret
  CKKS context), so the worker keeps only a few;
- a task's changes to `sys.path` (Flower puts each FAB's folder first) are undone before the next one.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import sys
from pathlib import Path

import pytest

from medtwin.experiments.site_worker import WORKER_SITES_KEPT, SiteWorker
from test_site_worker import wait_idle  # tests/unit is on sys.path (rootdir-relative imports)



@pytest.fixture(scope="module")
def parties(tmp_path_factory: pytest.TempPathFactory):
    from medtwin.core.config.compose import compose_config
    from medtwin.experiments.simulate import prepare_parties
    from medtwin.server.app import make_run_id

    runs = tmp_path_factory.mktemp("runs")
    config = compose_config(["task=breast_cancer", "task.num_sites=3", f"runs_dir={runs}"])
    config.run_id = make_run_id(config)
    return prepare_parties(config)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


# --- tasks the worker runs (module-level: a forked worker finds them by name) ---


def many_proposals_task(arguments: list[str]) -> int:
    """A coordinator cycling through proposal texts that differ only in a comment: one Site each."""
    from medtwin.client import site

    site_file, proposal_file, count, report = arguments
    text = Path(proposal_file).read_text(encoding="utf-8")
    for index in range(int(count)):
        site.load_site(site_file, f"{text}\n# variant {index}\n")
    with open(report, "a", encoding="utf-8") as out:
        out.write(json.dumps({"kept": site._load_site.cache_info().currsize}) + "\n")
    return 0


def sys_path_task(arguments: list[str]) -> int:
    """Flower's load_app puts the FAB's folder first on sys.path; the next task reports what it sees."""
    folder, report = arguments
    with open(report, "a", encoding="utf-8") as out:
        out.write(json.dumps({"path": list(sys.path)}) + "\n")
    sys.path.insert(0, folder)
    return 0


# --- tests ---


def test_a_kit_that_drops_a_federation_member_is_what_the_next_message_checks(parties) -> None:
    from medtwin.client.site import load_site
    from medtwin.core.identity import load_manifest

    site_file = parties.site_files[0]
    first = load_site(site_file, parties.proposal_text)
    kit_dir = first.file.kit_dir
    removed = next(entry.site_id for entry in first.kit.manifest.sites if entry.site_id != first.site_id)
    manifest = load_manifest(kit_dir)
    try:
        # the admin removes a compromised site; `medtwin site join --manifest` installs the newer manifest
        dataclasses.replace(manifest, sites=tuple(s for s in manifest.sites if s.site_id != removed)).save(Path(kit_dir) / "federation.json")
        second = load_site(site_file, parties.proposal_text)
        assert removed not in second.kit.manifest.site_ids, "the warm site still counts a removed member's signatures"
    finally:
        manifest.save(Path(kit_dir) / "federation.json")
    assert removed in load_site(site_file, parties.proposal_text).kit.manifest.site_ids


def test_a_coordinator_cannot_make_the_worker_hold_a_site_per_proposal_text(parties, tmp_path: Path) -> None:
    proposal, report = tmp_path / "proposal.yaml", tmp_path / "report.jsonl"
    proposal.write_text(parties.proposal_text, encoding="utf-8")
    worker = SiteWorker(multiprocessing.get_context("fork"), task=many_proposals_task)
    try:
        assert worker.submit(1, [str(parties.site_files[1]), str(proposal), str(WORKER_SITES_KEPT + 3), str(report)])
        wait_idle(worker, done=1)
    finally:
        worker.close()
    assert _records(report)[0]["kept"] <= WORKER_SITES_KEPT


def test_a_task_leaves_sys_path_as_it_found_it(tmp_path: Path) -> None:
    report, folder = tmp_path / "report.jsonl", str(tmp_path / "fab-of-run-a")
    worker = SiteWorker(multiprocessing.get_context("fork"), task=sys_path_task)
    try:
        for done in (1, 2):
            assert worker.submit(done, [folder, str(report)])
            wait_idle(worker, done=done)
    finally:
        worker.close()
    first, second = _records(report)
    assert folder not in second["path"]
    assert first["path"] == second["path"]
