"""The sweep collector on synthetic job folders: rows per setting, mean ± std over seeds, plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from medtwin.experiments.collect import collect, cost_by_setting, markdown_table, parse_overrides, read_sweep, results_rows, swept_keys


def write_job(
    sweep: Path, num: int, *, epsilon: float, seed: int, accuracy: list[float], crypto: str = "plain", bytes_per_parameter: float = 4.0
) -> None:
    """A job folder as Hydra + `simulate` leave it: .hydra/overrides.yaml beside <run_id>/summary.json."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"privacy.target_epsilon={epsilon}", f"seed={seed}", "task=breast_cancer", "privacy=dp", f"crypto={crypto}"]
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {line}\n" for line in overrides))
    run = job / f"run-{num}"
    run.mkdir()
    summary = {
        "primary_metric": "accuracy",
        "seed": seed,
        "final_metrics": {"pooled": {"accuracy": accuracy[-1], "n": 100.0}, "sites": {}},
        "privacy": {"a": {"epsilon": epsilon * 0.9, "delta": 1e-5}, "b": {"epsilon": epsilon * 0.99, "delta": 1e-5}},
        "crypto": {"scheme": crypto, "bytes_per_parameter": bytes_per_parameter, "num_parameters": 10},
        "round_time_s": [1.0, 3.0],
    }
    (run / "summary.json").write_text(json.dumps(summary))
    lines = [{"phase": "train", "round": r + 1} for r in range(len(accuracy))]
    lines += [{"phase": "evaluate", "round": r + 1, "pooled": {"accuracy": value}} for r, value in enumerate(accuracy)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for num, (epsilon, seed, accuracy) in enumerate(
        [(1.0, 42, [0.5, 0.6]), (1.0, 43, [0.6, 0.8]), (3.0, 42, [0.7, 0.9]), (3.0, 43, [0.7, 0.9])]
    ):
        write_job(tmp_path, num, epsilon=epsilon, seed=seed, accuracy=accuracy)
    (tmp_path / "4" / ".hydra").mkdir(parents=True)  # a job that failed: no summary
    (tmp_path / "4" / ".hydra" / "overrides.yaml").write_text("- seed=44\n")
    return tmp_path


def test_parse_overrides_drops_prefixes_and_hydra_keys() -> None:
    assert parse_overrides(["+a.b=1", "task=x", "hydra.job.chdir=false"]) == {"a.b": "1", "task": "x"}


def test_one_row_per_setting_with_mean_and_std_over_seeds(sweep: Path) -> None:
    jobs = read_sweep(sweep)
    assert len(jobs) == 4  # the failed job is left out
    assert swept_keys(jobs) == ["privacy.target_epsilon"]  # seed is averaged over, constant keys are not columns
    rows = results_rows(jobs)
    assert [row["privacy.target_epsilon"] for row in rows] == ["1.0", "3.0"]
    assert rows[0]["seeds"] == "42 43"
    assert rows[0]["pooled_accuracy_mean"] == pytest.approx(0.7)
    assert rows[0]["pooled_accuracy_std"] == pytest.approx(math.sqrt(0.02))  # sample std of 0.6, 0.8
    assert rows[1]["pooled_accuracy_std"] == pytest.approx(0.0)
    assert rows[0]["epsilon_mean"] == pytest.approx(0.99)  # the most any site spent
    assert rows[0]["update_bytes_mean"] == pytest.approx(40.0)
    assert rows[0]["round_time_s_mean"] == pytest.approx(2.0)
    assert "| 1.0 | 42 43 | 0.7 ± 0.14 |" in markdown_table(rows)


def test_collect_writes_table_and_plots(sweep: Path) -> None:
    written = collect(sweep)
    assert {path.name for path in written} == {
        "results.csv", "results.md", "utility_per_round.png", "cost_per_round.png", "utility_vs_epsilon.png"
    }  # fmt: skip
    with (sweep / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2
    assert all(path.stat().st_size > 1000 for path in written if path.suffix == ".png")


def test_no_epsilon_plot_without_dp(tmp_path: Path) -> None:
    write_job(tmp_path, 0, epsilon=1.0, seed=42, accuracy=[0.5])
    summary_path = tmp_path / "0" / "run-0" / "summary.json"
    summary_path.write_text(json.dumps(json.loads(summary_path.read_text()) | {"privacy": {}}))
    assert "utility_vs_epsilon.png" not in {path.name for path in collect(tmp_path)}


def test_a_folder_that_is_not_a_sweep_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no job folders"):
        collect(tmp_path)


def test_cost_per_round_by_crypto_setting(tmp_path: Path) -> None:
    for num, (crypto, seed, bytes_per_parameter) in enumerate([("plain", 42, 4.0), ("plain", 43, 4.0), ("ckks", 42, 8.5), ("ckks", 43, 8.5)]):
        write_job(tmp_path, num, epsilon=1.0, seed=seed, accuracy=[0.5], crypto=crypto, bytes_per_parameter=bytes_per_parameter)
    costs = {cost.scheme: cost for cost in cost_by_setting(read_sweep(tmp_path))}
    assert costs["ckks"].label == "crypto=ckks" and costs["plain"].label == "crypto=plain"
    assert (costs["ckks"].update_bytes, costs["plain"].update_bytes) == (85.0, 40.0)
    assert costs["ckks"].round_time_s == pytest.approx(2.0)
    written = {path.name: path for path in collect(tmp_path)}
    assert written["cost_per_round.png"].stat().st_size > 1000
