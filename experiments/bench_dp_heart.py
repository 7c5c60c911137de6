"""Fed-Heart-Disease (FLamby protocol) under DP-SGD at every site: accuracy vs epsilon, 5 seeds.

    python -m medtwin.experiments.bench_dp_heart [--epsilons 0.5 1 3 8] [--seeds 42 43 44 45 46]

Real Flower simulations (Ray), FedAvg with the tuned client learning rate, DP calibrated over the
whole participation (15 rounds x 100 steps). Prints mean ± std of the pooled-test accuracy and of
the mean of the 4 per-centre accuracies (FLamby's DP example reports the latter).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from medtwin.core.config import compose_config

from .bench_fed_heart_disease import git_commit
from .simulate import simulate

FLAMBY_DP = {"none": "0.713", "8.0": "≈0.70", "3.0": "—", "1.0": "0.685–0.706", "0.5": "—"}


def run(seed: int, epsilon: float | None, scratch: Path) -> dict:
    privacy = ["privacy=none"] if epsilon is None else ["privacy=dp", f"privacy.target_epsilon={epsilon}"]
    runs = scratch / f"eps-{epsilon}-seed-{seed}" / "runs"
    config = compose_config(
        [f"seed={seed}", "strategy=fedavg_tuned", f"runs_dir={runs}", "progress=false", "baselines.enabled=true", *privacy]
    )
    summary = json.loads((simulate(config) / "summary.json").read_text())
    return summary["baselines"]["rows"]["federated"] | {"epsilon": max((v["epsilon"] for v in summary["privacy"].values()), default=None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 3.0, 8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for epsilon in [None, *args.epsilons]:
            results = [run(seed, epsilon, Path(scratch)) for seed in args.seeds]
            pooled = [r["pooled_test"] for r in results]
            centres = [r["mean_of_sites"] for r in results]
            spent = [r["epsilon"] for r in results if r["epsilon"] is not None]
            label = "none" if epsilon is None else f"{epsilon}"
            rows.append((label, pooled, centres, spent))
            print(f"eps {label}: pooled {np.mean(pooled):.3f}, mean of centres {np.mean(centres):.3f}", flush=True)
    print(f"\nFed-Heart-Disease + DP-SGD, seeds {args.seeds}, commit {git_commit()}\n")
    print("| target ε | ε spent (max site) | pooled test | mean of 4 centres | FLamby DP example (mean of centres) |")
    print("|---|---|---|---|---|")
    for label, pooled, centres, spent in rows:
        spent_text = f"{max(spent):.2f}" if spent else "—"
        print(
            f"| {label} | {spent_text} | {np.mean(pooled):.3f} ± {np.std(pooled):.3f} | "
            f"{np.mean(centres):.3f} ± {np.std(centres):.3f} | {FLAMBY_DP.get(label, '—')} |"
        )


if __name__ == "__main__":
    main()
