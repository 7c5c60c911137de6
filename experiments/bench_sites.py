"""Simulation cost per site as the federation grows (issue 12: flat within ±20% from 8 to 64 sites;
256 simulated sites complete a 3-round run on 2 cores; peak memory per site count).

    python -m medtwin.experiments.bench_sites [--sites 8 16 32 64] [--repeats 2] [--rounds 4]
        [--large 256] [--out .medtwin/bench/sites.json]

Each point is a real `medtwin run` (a fresh process, the researcher's entry point) of breast_cancer split
iid across N sites, plain updates, no chain, no baselines, everything else as configured. The site
counts run interleaved (8 16 32 64 64 32 16 8 for two repeats), so a neighbour's load falls on all of them.

- per-site round cost = median over rounds 2.. of (train + evaluate `time_s` in metrics.jsonl) / N.
  Round 1 also starts the Ray actors, so it is reported apart.
- peak memory: every process of the run's tree (driver, raylet, GCS, Ray workers), scanned every 0.5 s:
  `sum_hwm_mib` = the sum of each process's own VmHWM (its peak resident set; an upper bound on the
  tree's simultaneous peak), `peak_rss_mib` = the largest sum of VmRSS seen at one scan, and the largest
  single Ray worker's VmHWM (`worker_hwm_mib`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from medtwin.core.rundir import atomic_write_text

from .flower_local import ProcessTree

SPLIT = ["task=breast_cancer", "task.partition.scheme=iid", "task.partition.min_samples_per_site=2"]
CHEAPEST = ["crypto=plain", "chain=none", "privacy=none", "baselines.enabled=false", "progress=false"]


def run_overrides(num_sites: int, *, rounds: int, runs_dir: Path) -> list[str]:
    """The `medtwin run` overrides of one point (only the number of sites differs between points)."""
    return [*SPLIT, f"task.num_sites={num_sites}", "federation=quick", f"federation.num_rounds={rounds}", *CHEAPEST, f"runs_dir={runs_dir}"]


def _status_kib(pid: int, field_name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@dataclass
class MemoryWatch:
    """Peak memory of a process tree, scanned while it runs (see the module docstring)."""

    tree: ProcessTree
    interval_s: float = 0.5
    hwm_kib: dict[tuple[int, int], tuple[str, int]] = field(default_factory=dict)  # (pid, start) -> (name, VmHWM)
    peak_rss_kib: int = 0
    _stopped: threading.Event = field(default_factory=threading.Event)

    def start(self) -> MemoryWatch:
        threading.Thread(target=self._watch, name="memory-watch", daemon=True).start()
        return self

    def scan(self) -> None:
        total_rss = 0
        for process in self.tree.seen:
            rss, hwm = _status_kib(process.pid, "VmRSS"), _status_kib(process.pid, "VmHWM")
            if rss is None or hwm is None:
                continue
            total_rss += rss
            key = (process.pid, process.start_ticks)
            self.hwm_kib[key] = (process.name, max(hwm, self.hwm_kib.get(key, ("", 0))[1]))
        self.peak_rss_kib = max(self.peak_rss_kib, total_rss)

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self.scan()

    def stop(self) -> dict:
        self._stopped.set()
        workers = [hwm for name, hwm in self.hwm_kib.values() if "ClientAppActor" in name or name.startswith("ray::")]
        return {
            "sum_hwm_mib": round(sum(hwm for _, hwm in self.hwm_kib.values()) / 1024, 1),
            "peak_rss_mib": round(self.peak_rss_kib / 1024, 1),
            "worker_hwm_mib": round(max(workers, default=0) / 1024, 1),
            "processes": len(self.hwm_kib),
        }


def round_costs(run_path: Path) -> tuple[dict[int, float], dict[int, int]]:
    """From the run's metrics.jsonl: wall seconds of each round (its train and evaluate phases), and the
    number of sites whose update each round aggregated."""
    seconds: dict[int, float] = {}
    aggregated: dict[int, int] = {}
    for line in (run_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["phase"] in ("train", "evaluate"):
            seconds[int(record["round"])] = seconds.get(int(record["round"]), 0.0) + float(record["time_s"])
        if record["phase"] == "train":
            aggregated[int(record["round"])] = len(record["participants"])
    return seconds, aggregated


def measure(num_sites: int, *, rounds: int, work_dir: Path) -> dict:
    """One `medtwin run` at `num_sites` sites in its own process tree: wall time, round costs, memory."""
    runs_dir = work_dir / f"runs-{num_sites}-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "medtwin.experiments.cli", "run", *run_overrides(num_sites, rounds=rounds, runs_dir=runs_dir)]
    log_path = runs_dir.with_suffix(".log")
    started = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        tree = ProcessTree(process)
        watch = MemoryWatch(tree).start()
        try:
            returncode = process.wait()
        finally:
            watch.scan()
            memory = watch.stop()
            tree.stop()
    wall_s = time.monotonic() - started
    runs = sorted(runs_dir.glob("*/metrics.jsonl")) if runs_dir.is_dir() else []
    if returncode != 0 or not runs:
        raise RuntimeError(f"`medtwin run` at {num_sites} sites failed (exit {returncode}); its output: {log_path}")
    seconds, aggregated = round_costs(runs[0].parent)
    later = [seconds[server_round] for server_round in sorted(seconds) if server_round >= 2]
    median_round_s = statistics.median(later) if later else seconds[1]
    return {
        "sites": num_sites,
        "rounds": len(seconds),
        "wall_s": round(wall_s, 2),
        "round1_s": round(seconds[1], 3),
        "median_round_s": round(median_round_s, 3),
        "per_site_s": median_round_s / num_sites,
        "aggregated_per_round": [aggregated[server_round] for server_round in sorted(aggregated)],
        "memory": memory,
        "run": str(runs[0].parent),
    }


def interleaved(site_counts: list[int], repeats: int) -> list[int]:
    """Ascending, then descending, and so on: 8 16 32 64 64 32 16 8 for two repeats."""
    order: list[int] = []
    for repeat in range(repeats):
        order += site_counts if repeat % 2 == 0 else site_counts[::-1]
    return order


def summarise(points: list[dict], site_counts: list[int]) -> list[dict]:
    """Per site count: the median per-site cost over repeats, its ratio to the smallest count, peak memory."""
    rows = []
    for num_sites in site_counts:
        mine = [point for point in points if point["sites"] == num_sites]
        rows.append(
            {
                "sites": num_sites,
                "per_site_s": statistics.median(point["per_site_s"] for point in mine),
                "per_site_s_each": [round(point["per_site_s"], 4) for point in mine],
                "sum_hwm_mib": max(point["memory"]["sum_hwm_mib"] for point in mine),
                "peak_rss_mib": max(point["memory"]["peak_rss_mib"] for point in mine),
                "worker_hwm_mib": max(point["memory"]["worker_hwm_mib"] for point in mine),
                "wall_s": statistics.median(point["wall_s"] for point in mine),
            }
        )
    for row in rows:
        row["ratio"] = row["per_site_s"] / rows[0]["per_site_s"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'sites':>6} {'per-site s':>10} {'ratio':>6} {'each':>20} {'sum VmHWM MiB':>14} {'peak RSS MiB':>13} {'wall s':>7}")
    for row in rows:
        each = " ".join(f"{value:.3f}" for value in row["per_site_s_each"])
        print(
            f"{row['sites']:>6} {row['per_site_s']:>10.3f} {row['ratio']:>6.2f} {each:>20} "
            f"{row['sum_hwm_mib']:>14.0f} {row['peak_rss_mib']:>13.0f} {row['wall_s']:>7.0f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each timed run (round 1 is not timed)")
    parser.add_argument("--large", type=int, default=256, help="sites of the one 3-round run that must complete (0: skip)")
    parser.add_argument("--out", type=Path, default=Path(".medtwin/bench/sites.json"))
    arguments = parser.parse_args(argv)
    if min(arguments.sites) < 2 or arguments.rounds < 2:
        parser.error("--sites must be >= 2 (a round certificate needs two sites) and --rounds >= 2 (round 1 is not timed)")
    site_counts = sorted(set(arguments.sites))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="medtwin-bench-sites-") as folder:
        points = []
        for num_sites in interleaved(site_counts, arguments.repeats):
            points.append(measure(num_sites, rounds=arguments.rounds, work_dir=Path(folder)))
            point = points[-1]
            print(f"{num_sites} sites: {point['per_site_s']:.3f} s/site, round 1 {point['round1_s']:.1f} s, {point['wall_s']:.0f} s wall", flush=True)
        large = None
        if arguments.large:
            try:
                large = measure(arguments.large, rounds=3, work_dir=Path(folder))
            except RuntimeError as error:  # the table above still stands: record why the large run failed
                large = {"sites": arguments.large, "error": str(error)}
                log = next(Path(folder).glob(f"runs-{arguments.large}-*.log"), None)
                if log is not None:
                    large["log_tail"] = log.read_text(encoding="utf-8", errors="replace")[-3000:]
    rows = summarise(points, site_counts)
    print_table(rows)
    if large is not None and "error" in large:
        print(f"{arguments.large} sites: FAILED: {large['error']}\n{large.get('log_tail', '')}")
    elif large is not None:
        print(
            f"{arguments.large} sites, {large['rounds']} rounds: completed in {large['wall_s']:.0f} s "
            f"({large['per_site_s']:.3f} s/site a round, round 1 {large['round1_s']:.0f} s); "
            f"sum VmHWM {large['memory']['sum_hwm_mib']:.0f} MiB, peak RSS {large['memory']['peak_rss_mib']:.0f} MiB; "
            f"updates aggregated per round {large['aggregated_per_round']}"
        )
    result = {
        "command": "python -m medtwin.experiments.bench_sites " + " ".join(argv if argv is not None else sys.argv[1:]),
        "overrides": run_overrides(0, rounds=arguments.rounds, runs_dir=Path("<tmp>")),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "rows": rows,
        "points": points,
        "large": large,
    }
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(arguments.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {arguments.out}")


if __name__ == "__main__":
    main()
