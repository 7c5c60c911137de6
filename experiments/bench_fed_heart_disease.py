"""Fed-Heart-Disease under FLamby's protocol, 5 seeds, next to FLamby's published table.

    python -m medtwin.experiments.bench_fed_heart_disease [--seeds 42 43 44 45 46] [--strategies fedavg fedavg_tuned]

Every federated run is a real Flower simulation (Ray); baselines use the same splits and recipe.
Prints a Markdown table (mean ± population std over seeds) ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from medtwin.core.config import compose_config

from .simulate import simulate

FLAMBY = {  # FLamby's stored results, accuracy: (pooled test, mean of 4 centres)
    "pooled": (0.795, 0.735),
    "local:cleveland": (0.784, 0.722),
    "local:hungarian": (0.727, 0.629),
    "local:switzerland": (0.483, 0.567),
    "local:va": (0.611, 0.637),
    "federated fedavg": (0.748, 0.685),
    "federated fedprox": (0.748, 0.685),
}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_seed(seed: int, strategy: str, runs_dir: Path) -> tuple[dict, dict]:
    config = compose_config([f"seed={seed}", f"strategy={strategy}", f"runs_dir={runs_dir}", "progress=false"])
    run_path = simulate(config)
    summary = json.loads((run_path / "summary.json").read_text())
    return summary["baselines"]["rows"], summary


def fmt(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "fedavg_tuned", "fedprox"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results: dict[str, dict[str, list[float]]] = {}
    round_times: list[float] = []
    wall_times: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        for strategy in args.strategies:
            for seed in args.seeds:
                started = time.monotonic()
                rows, summary = run_seed(seed, strategy, Path(scratch))
                wall_times.append(time.monotonic() - started)
                round_times.extend(summary["round_time_s"])
                for name, row in rows.items():
                    label = f"federated {strategy}" if name == "federated" else name
                    if label.startswith("federated") or strategy == args.strategies[0]:
                        for column in ("pooled_test", "mean_of_sites"):
                            results.setdefault(label, {}).setdefault(column, []).append(row[column])
                print(f"{strategy} seed {seed}: federated pooled test {rows['federated']['pooled_test']:.3f}", flush=True)
    print(f"\nFed-Heart-Disease, seeds {args.seeds}, commit {git_commit()}\n")
    print("| model | pooled test (ours) | FLamby | mean of 4 centres (ours) | FLamby |")
    print("|---|---|---|---|---|")
    for label, columns in results.items():
        reference = FLAMBY.get(label, (None, None))
        ref = [f"{value:.3f}" if value is not None else "—" for value in reference]
        print(f"| {label} | {fmt(columns['pooled_test'])} | {ref[0]} | {fmt(columns['mean_of_sites'])} | {ref[1]} |")
    print(
        f"\nwall time per run (baselines + 15 federated rounds, incl. Ray start): {np.mean(wall_times):.1f} s; "
        f"one federated round with 4 sites (train + evaluate): {np.median(round_times):.2f} s median"
    )


if __name__ == "__main__":
    main()
