"""Turn a Hydra sweep into one results table and plots: `python -m medtwin.experiments.collect <sweep dir>`.

A sweep folder (from `python -m medtwin.experiments.run -m ...`) holds one folder per job: Hydra's
`.hydra/overrides.yaml` beside the job's run directory (`<run_id>/summary.json`, `metrics.jsonl`).
Jobs whose overrides differ only in `seed` form one setting; each setting becomes one row with the
mean ± sample std over its seeds of the pooled primary metric and of ε (the most spent by any site).

Writes, into the sweep folder (or --out): results.csv, results.md, utility_per_round.png,
cost_per_round.png (bytes of a site's update and seconds per round by setting, coloured by crypto
scheme) and, when ε varies across settings, utility_vs_epsilon.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

logger = logging.getLogger("medtwin")

SEED_KEY = "seed"
IGNORED_KEYS = (SEED_KEY, "run_id", "runs_dir", "progress")  # not part of what a setting is


@dataclass(frozen=True)
class Job:
    """One finished run of a sweep: its overrides, summary.json and per-round pooled metric."""

    overrides: dict[str, str]
    summary: dict[str, Any]
    pooled_per_round: list[float]

    @property
    def metric(self) -> str:
        return str(self.summary["primary_metric"])

    @property
    def pooled(self) -> float:
        return pooled_value(self.summary["final_metrics"]["pooled"], self.metric)

    @property
    def epsilon(self) -> float:
        """The largest ε any site spent in this run (nan without DP)."""
        spent = [_number(values.get("epsilon")) for values in (self.summary.get("privacy") or {}).values()]
        return max(spent, default=math.nan)

    @property
    def update_bytes(self) -> float:
        """Bytes of one site's update on the wire (bytes per parameter x parameters)."""
        crypto = self.summary["crypto"]
        return _number(crypto.get("bytes_per_parameter")) * _number(crypto.get("num_parameters"))

    @property
    def round_time_s(self) -> float:
        times = [_number(value) for value in self.summary.get("round_time_s") or []]
        return float(np.mean(times)) if times else math.nan


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def pooled_value(pooled: dict[str, Any], metric: str) -> float:
    """The pooled figure of `metric`: under its own name, or — for a metric that is not a mean over
    test rows (AUROC, ...) — under the name of the row-weighted mean of site values (core/pooled_metrics)."""
    return _number(pooled.get(metric, pooled.get(f"row_weighted_site_mean_{metric}")))


def parse_overrides(lines: Sequence[str]) -> dict[str, str]:
    """`["a.b=1", "task=x"]` -> {"a.b": "1", "task": "x"} (Hydra's `+`/`~` prefixes dropped)."""
    pairs = (line.lstrip("+~").partition("=") for line in lines)
    return {key: value for key, _, value in pairs if key and not key.startswith("hydra")}


def read_job(job_dir: Path) -> Job | None:
    """The job in `job_dir`, or None (with a warning) if it left no summary.json: failed or still running."""
    summaries = sorted(job_dir.glob("*/summary.json"))
    if not summaries:
        logger.warning("%s: no <run_id>/summary.json (the job failed or is running); left out", job_dir)
        return None
    run_path = summaries[0].parent
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text(encoding="utf-8")) or []
    summary = json.loads(summaries[0].read_text(encoding="utf-8"))
    metric = summary["primary_metric"]
    pooled_per_round = []
    metrics_path = run_path / "metrics.jsonl"
    if metrics_path.is_file():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("phase") == "evaluate":
                pooled_per_round.append(pooled_value(record.get("pooled") or {}, metric))
    return Job(parse_overrides(overrides), summary, pooled_per_round)


def read_sweep(sweep_dir: Path) -> list[Job]:
    """Every finished job of a sweep folder, in job-number order."""
    job_dirs = [path.parent.parent for path in sweep_dir.glob("*/.hydra/overrides.yaml")]
    job_dirs.sort(key=lambda path: (not path.name.isdigit(), int(path.name) if path.name.isdigit() else 0, path.name))
    if not job_dirs:
        raise FileNotFoundError(f"{sweep_dir} holds no job folders (<job>/.hydra/overrides.yaml): is it a Hydra sweep folder?")
    return [job for job in map(read_job, job_dirs) if job is not None]


def swept_keys(jobs: Sequence[Job]) -> list[str]:
    """Override keys (but seed & co.) whose value differs between jobs, in the order first given."""
    keys = dict.fromkeys(key for job in jobs for key in job.overrides if key not in IGNORED_KEYS)
    return [key for key in keys if len({job.overrides.get(key) for job in jobs}) > 1]


def group_by_setting(jobs: Sequence[Job]) -> dict[tuple[str, ...], list[Job]]:
    """Setting (values of the swept keys) -> its jobs, one per seed."""
    keys = swept_keys(jobs)
    groups: dict[tuple[str, ...], list[Job]] = {}
    for job in jobs:
        groups.setdefault(tuple(job.overrides.get(key, "") for key in keys), []).append(job)
    return groups


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the finite values; std is nan for fewer than two."""
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def results_rows(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """One row per setting: its swept values, the seeds, then mean/std of each measured quantity."""
    keys = swept_keys(jobs)
    rows = []
    for setting, members in group_by_setting(jobs).items():
        row: dict[str, Any] = dict(zip(keys, setting))
        row["seeds"] = " ".join(sorted(job.overrides.get(SEED_KEY, str(job.summary.get("seed", "?"))) for job in members))
        metric = members[0].metric
        for name, values in (
            (f"pooled_{metric}", [job.pooled for job in members]),
            ("epsilon", [job.epsilon for job in members]),
            ("update_bytes", [job.update_bytes for job in members]),
            ("round_time_s", [job.round_time_s for job in members]),
        ):
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std(values)
        rows.append(row)
    return rows


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(column for row in rows for column in row))


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=_columns(rows))
        writer.writeheader()
        writer.writerows({key: ("" if isinstance(v, float) and math.isnan(v) else v) for key, v in row.items()} for row in rows)


def _mean_pm_std(mean: object, std: object) -> str:
    if not isinstance(mean, float) or math.isnan(mean):
        return "–"
    if not isinstance(std, float) or math.isnan(std):
        return f"{mean:.4g}"
    return f"{mean:.4g} ± {std:.2g}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows with each `<name>_mean`/`<name>_std` pair shown as one `mean ± std` cell."""
    columns = _columns(rows)
    shown = [column for column in columns if not column.endswith("_std")]
    header = [column.removesuffix("_mean") for column in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            _mean_pm_std(row.get(column), row.get(column.removesuffix("_mean") + "_std")) if column.endswith("_mean")
            else str(row.get(column, ""))
            for column in shown
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _label(keys: Sequence[str], setting: Sequence[str], *, without: str = "") -> str:
    return ", ".join(f"{key}={value}" for key, value in zip(keys, setting) if key != without) or "all"


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, headless, imported only when a plot is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_utility_per_round(jobs: Sequence[Job], path: Path) -> None:
    """Pooled primary metric after each round, mean over seeds, one line per setting."""
    plt = _pyplot()

    keys = swept_keys(jobs)
    figure, axes = plt.subplots(figsize=(6, 4))
    for setting, members in group_by_setting(jobs).items():
        rounds = min(len(job.pooled_per_round) for job in members)
        if rounds == 0:
            continue
        curve = np.nanmean([job.pooled_per_round[:rounds] for job in members], axis=0)
        axes.plot(range(1, rounds + 1), curve, marker="o", label=_label(keys, setting))
    axes.set_xlabel("round")
    axes.set_ylabel(f"pooled {jobs[0].metric}")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_utility_vs_epsilon(jobs: Sequence[Job], path: Path) -> bool:
    """Pooled primary metric against ε spent (mean ± std over seeds); False (no file) if ε does not vary."""
    plt = _pyplot()

    keys = swept_keys(jobs)
    points: dict[str, list[tuple[float, float, float, float]]] = {}
    for setting, members in group_by_setting(jobs).items():
        epsilon, epsilon_std = mean_std([job.epsilon for job in members])
        utility, utility_std = mean_std([job.pooled for job in members])
        if math.isfinite(epsilon):
            series = _label(keys, setting, without="privacy.target_epsilon")
            points.setdefault(series, []).append((epsilon, utility, epsilon_std, utility_std))
    if len({point[0] for series in points.values() for point in series}) < 2:
        return False
    figure, axes = plt.subplots(figsize=(6, 4))
    for series, values in points.items():
        x, y, x_err, y_err = (np.nan_to_num(np.array(column)) for column in zip(*sorted(values)))
        axes.errorbar(x, y, xerr=x_err, yerr=y_err, marker="o", capsize=3, label=series)
    axes.set_xscale("log")
    axes.set_xlabel("ε spent (largest over sites)")
    axes.set_ylabel(f"pooled {jobs[0].metric}")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


@dataclass(frozen=True)
class Cost:
    """What one setting pays per round (means over its seeds): one site's update on the wire, wall time."""

    label: str
    scheme: str
    update_bytes: float
    round_time_s: float


def cost_by_setting(jobs: Sequence[Job]) -> list[Cost]:
    """One `Cost` per setting, labelled by its swept values, with its crypto scheme (plain, ckks, ...)."""
    keys = swept_keys(jobs)
    return [
        Cost(
            label=_label(keys, setting),
            scheme=str(members[0].summary["crypto"].get("scheme", "?")),
            update_bytes=mean_std([job.update_bytes for job in members])[0],
            round_time_s=mean_std([job.round_time_s for job in members])[0],
        )
        for setting, members in group_by_setting(jobs).items()
    ]


def plot_cost_per_round(jobs: Sequence[Job], path: Path) -> None:
    """Bytes of one site's update and wall time per round, one bar per setting, coloured by crypto scheme."""
    plt = _pyplot()

    costs = cost_by_setting(jobs)
    schemes = sorted({cost.scheme for cost in costs})
    colours = {scheme: plt.get_cmap("tab10")(index) for index, scheme in enumerate(schemes)}
    figure, (bytes_axes, time_axes) = plt.subplots(1, 2, figsize=(10, max(3.0, 0.4 * len(costs) + 1.5)))
    positions = np.arange(len(costs))
    for axes, values, unit in (
        (bytes_axes, [cost.update_bytes / 1024 for cost in costs], "KiB per site update per round"),
        (time_axes, [cost.round_time_s for cost in costs], "seconds per round"),
    ):
        axes.barh(positions, np.nan_to_num(values), color=[colours[cost.scheme] for cost in costs])
        axes.set_xlabel(unit)
        axes.set_yticks(positions, [cost.label for cost in costs], fontsize="small")
        axes.invert_yaxis()
    time_axes.set_yticks(positions, [""] * len(costs))
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[scheme]) for scheme in schemes]
    figure.legend(handles, [f"crypto={scheme}" for scheme in schemes], loc="upper right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def collect(sweep_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the sweep's table (CSV, markdown) and plots; returns the files written."""
    jobs = read_sweep(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"no job of {sweep_dir} finished (no <job>/<run_id>/summary.json)")
    out_dir = out_dir or sweep_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = results_rows(jobs)
    written = [out_dir / "results.csv", out_dir / "results.md", out_dir / "utility_per_round.png", out_dir / "cost_per_round.png"]
    write_csv(rows, written[0])
    fixed = sorted({f"{k}={v}" for job in jobs for k, v in job.overrides.items() if k not in swept_keys(jobs) and k != SEED_KEY})
    title = f"# Sweep {sweep_dir.name}: {len(jobs)} run(s), {len(rows)} setting(s)\n\nFixed: `{' '.join(fixed) or '(defaults)'}`\n\n"
    written[1].write_text(title + markdown_table(rows), encoding="utf-8")
    plot_utility_per_round(jobs, written[2])
    plot_cost_per_round(jobs, written[3])
    if plot_utility_vs_epsilon(jobs, out_dir / "utility_vs_epsilon.png"):
        written.append(out_dir / "utility_vs_epsilon.png")
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medtwin.experiments.collect", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder (hydra.sweep.dir; default .medtwin/sweeps/<time>)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the table and plots (default: the sweep folder)")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in collect(arguments.sweep_dir, arguments.out):
        print(path)
    print((arguments.out or arguments.sweep_dir).joinpath("results.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
