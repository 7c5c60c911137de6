"""The site file is the hospital's authority: typed, checked, every problem reported with its key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from medtwin.client.site_file import DEFAULT_VITALS_WINDOW_BOUNDS, SiteFileError, load_site_file

VALID = {
    "site_id": "cleveland",
    "data": {"builtin": {"task": "fed_heart_disease", "index": 0}},
    "privacy": {"max_epsilon": 3.0, "max_delta": 1e-5},
    "kit_dir": "kit",
    "state_dir": "state",
}


def _write(tmp_path: Path, document: dict) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_a_minimal_site_file_gets_safe_defaults(tmp_path: Path) -> None:
    site = load_site_file(_write(tmp_path, VALID))
    assert site.privacy.require_dp is True  # a real site requires DP unless it says otherwise
    assert site.privacy.max_total_epsilon == 10.0  # the lifetime cap is on by default
    assert site.kit_dir == (tmp_path / "kit").resolve() and site.state_dir == (tmp_path / "state").resolve()
    assert site.accept.tasks == ("fed_heart_disease",)
    assert site.evaluation.release == "rounded" and site.evaluation.min_participants == 2


def test_every_problem_is_reported_with_its_key(tmp_path: Path) -> None:
    document = {
        **VALID,
        "site_id": "../etc",
        "privacy": {"max_epsilon": "lots", "require_dp": False},
        "evaluation": {"release": "everything"},
        "surprise": 1,
    }
    with pytest.raises(SiteFileError) as caught:
        load_site_file(_write(tmp_path, document))
    message = str(caught.value)
    for expected in ("`site_id`", "`privacy.max_epsilon` must be float", "`privacy.max_delta` is missing",
                     "research_simulation", "`evaluation.release`", "unknown key `surprise`", str(tmp_path / "site.yaml")):  # fmt: skip
        assert expected in message, expected


def test_only_a_research_simulation_may_waive_dp(tmp_path: Path) -> None:
    site = load_site_file(_write(tmp_path, {**VALID, "research_simulation": True, "privacy": {**VALID["privacy"], "require_dp": False}}))
    assert site.privacy.require_dp is False


def test_no_interpolation_is_resolved_in_a_site_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDTWIN_SECRET", "s3cret")
    site = load_site_file(_write(tmp_path, {**VALID, "state_dir": "${oc.env:MEDTWIN_SECRET}"}))
    assert "s3cret" not in str(site.state_dir) and site.state_dir.name == "${oc.env:MEDTWIN_SECRET}"


def test_the_vitals_window_bounds_default_and_come_from_the_site_file(tmp_path: Path) -> None:
    assert load_site_file(_write(tmp_path, VALID)).accept.vitals == DEFAULT_VITALS_WINDOW_BOUNDS
    assert DEFAULT_VITALS_WINDOW_BOUNDS.window_h == (0.25, 24.0) and DEFAULT_VITALS_WINDOW_BOUNDS.grid_min == (5.0, 240.0)
    site = load_site_file(_write(tmp_path, {**VALID, "accept": {"vitals": {"window_h": [1, 6], "grid_min": ["1e1", 60]}}}))
    assert site.accept.vitals.window_h == (1.0, 6.0) and site.accept.vitals.grid_min == (10.0, 60.0)
    assert site.accept.vitals.horizon_h == DEFAULT_VITALS_WINDOW_BOUNDS.horizon_h  # a bound left out keeps its default


@pytest.mark.parametrize(
    ("vitals", "expected"),
    [
        ({"window_h": [5]}, "`accept.vitals.window_h` must be [min, max] with 0 < min <= max, got [5]"),
        ({"window_h": [10, 5]}, "`accept.vitals.window_h` must be [min, max] with 0 < min <= max, got [10, 5]"),
        ({"stride_h": "x"}, "`accept.vitals.stride_h` must be [min, max]"),
        ({"grid_min": [0, 60]}, "`accept.vitals.grid_min` must be [min, max]"),
        ({"horizon_h": [1, float("inf")]}, "`accept.vitals.horizon_h` must be [min, max]"),
        ({"horizon_h": [True, 2]}, "`accept.vitals.horizon_h` must be [min, max]"),
        ({"window_hours": [1, 6]}, "unknown key `accept.vitals.window_hours`"),
        ("x", "`accept.vitals` must be a mapping"),
    ],
)
def test_a_malformed_accept_vitals_is_a_site_file_error_naming_the_key(tmp_path: Path, vitals: object, expected: str) -> None:
    with pytest.raises(SiteFileError) as caught:
        load_site_file(_write(tmp_path, {**VALID, "accept": {"vitals": vitals}}))
    assert expected in str(caught.value)


def test_kit_and_state_must_be_different_folders(tmp_path: Path) -> None:
    with pytest.raises(SiteFileError, match="different folders"):
        load_site_file(_write(tmp_path, {**VALID, "state_dir": "kit"}))


def test_a_fresh_clone_holds_no_run_state() -> None:
    """Ledgers, kits and chain state never enter git: a fresh clone has no spent budget and no keys."""
    root = Path(__file__).resolve().parents[2]
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    forbidden = [path for path in tracked if path.startswith((".medtwin-sites/", ".medtwin-kits/", ".medtwin/", "runs/"))]
    assert forbidden == []
    assert not [path for path in tracked if path.endswith(("privacy-ledger.json", "ledger-mark.json", "signing_key.pem"))]
    ignored = (root / ".gitignore").read_text().split()
    assert {".medtwin-sites/", ".medtwin-kits/", ".medtwin/"} <= set(ignored)


@pytest.mark.parametrize("run_id", ["../escape", "a/b", "", "x" * 200, "run\x00id", "ré", "run-1\n", "run-1\nx"])
def test_run_ids_that_could_escape_a_folder_are_refused_everywhere(tmp_path: Path, run_id: str) -> None:
    from medtwin.client.site_state import SiteApprovals, SiteStateError
    from medtwin.core.errors import ConfigError
    from medtwin.core.rundir import RunDirectory

    with pytest.raises(ConfigError, match="run_id"):
        RunDirectory(tmp_path / "runs", run_id)
    with pytest.raises(SiteStateError):
        SiteApprovals(tmp_path / "state").approve(run_id=run_id, config_hash="c", code_hash="d")
    assert not list(tmp_path.rglob("escape*"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value", ["run-1\n", "run-1\r", "\nrun-1", "run-1 ", "run-1\n\n"])
def test_an_id_with_a_trailing_newline_is_not_an_id(value: str) -> None:
    from medtwin.core.ids import check_id

    assert "not a valid id" in check_id(value)
    assert check_id("run-1") == ""


def test_the_anchor_wait_comes_from_the_site_file_and_is_bounded(tmp_path: Path) -> None:
    chain = {"approvals": "chain", "chain": {"state_dir": "/srv/chain"}}
    assert load_site_file(_write(tmp_path, {**VALID, **chain})).anchor_wait_s == 5.0  # the default
    waits = load_site_file(_write(tmp_path, {**VALID, **chain, "chain": {"state_dir": "/srv/chain", "anchor_wait_s": 12}}))
    assert waits.anchor_wait_s == 12.0
    for bad, expected in ((-1, "`chain.anchor_wait_s` must be >= 0"), (3600, "`chain.anchor_wait_s` is 3600 s, above 300 s"),
                          ("soon", "`chain.anchor_wait_s` must be float")):  # fmt: skip
        with pytest.raises(SiteFileError, match=expected):
            load_site_file(_write(tmp_path, {**VALID, **chain, "chain": {"state_dir": "/srv/chain", "anchor_wait_s": bad}}))
