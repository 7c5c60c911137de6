"""The run directory is written atomically and keeps its contract."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medtwin.core.rundir import SUMMARY_KEYS, RunDirectory, atomic_write_text


def test_atomic_write_leaves_old_file_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "summary.json"
    atomic_write_text(target, "old")

    def broken_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"], "temporary file left behind"


def test_summary_contract_is_enforced(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path, "r1")
    with pytest.raises(ValueError, match="contract keys"):
        run.write_summary({"run_id": "r1"})
    summary = {key: {} for key in SUMMARY_KEYS} | {"run_id": "r1", "final_metrics": {"x": float("nan")}}
    run.write_summary(summary)
    assert json.loads(run.summary_path.read_text())["final_metrics"]["x"] is None


def test_metrics_lines_append(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path, "r2")
    run.append_metrics({"round": 1, "phase": "train"})
    run.append_metrics({"round": 1, "phase": "evaluate"})
    assert [record["phase"] for record in run.read_metrics()] == ["train", "evaluate"]
    assert (run.path / "checkpoints").is_dir() and (run.path / "artifacts").is_dir()
