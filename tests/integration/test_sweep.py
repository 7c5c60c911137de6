"""A 2-point Hydra multirun (`python -m medtwin.experiments.run -m`, joblib launcher) on the tiniest preset, then the collector.

One round of breast cancer on 2 sites, DP at ε 1 and 8, no baselines: the same `simulate` as `medtwin
run`, one job folder per point under the sweep folder, and a results table with one row per ε."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from medtwin.experiments.collect import collect

pytestmark = pytest.mark.slow

TINY = [
    "task=breast_cancer",
    "task.num_sites=2",
    "federation=quick",
    "federation.num_rounds=1",
    "strategy.local_steps=10",
    "baselines.enabled=false",
    "progress=false",
    "crypto=plain",
    "privacy=dp",
]


def test_multirun_then_collect(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "medtwin.experiments.run", "-m", *TINY, "privacy.target_epsilon=1,8", f"hydra.sweep.dir={sweep}",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",  # the local parallel launcher: both jobs at once
    ]  # fmt: skip
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]

    summaries = sorted(sweep.glob("*/*/summary.json"))
    assert [path.parent.parent.name for path in summaries] == ["0", "1"]  # one run per job folder
    assert len({path.parent.name for path in summaries}) == 2  # distinct run ids
    assert not (tmp_path / "runs").exists()  # nothing outside the sweep folder

    written = {path.name: path for path in collect(sweep)}
    with written["results.csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["privacy.target_epsilon"] for row in rows] == ["1", "8"]
    for row, target in zip(rows, (1.0, 8.0)):
        assert 0.0 < float(row["epsilon_mean"]) <= target * 1.01  # each site stays within its target
        assert 0.0 <= float(row["pooled_accuracy_mean"]) <= 1.0
    assert "| 1 | 42 |" in written["results.md"].read_text()
    for name in ("utility_per_round.png", "utility_vs_epsilon.png"):
        assert written[name].stat().st_size > 1000, name
