"""FLamby's Fed-Heart-Disease table, side by side with ours: one command, every row a real Flower simulation.

    python -m medtwin.experiments.reproduce_flamby_heart                 # 5 seeds (42-46), every setting
    python -m medtwin.experiments.reproduce_flamby_heart --preset small  # 1 seed, every setting (< 10 min)

Rows: pooled training and each hospital alone (Adam 1e-3, 50 epochs: FLamby's baselines, trained in
every run on the run's own splits), FedAvg and FedProx with FLamby's recipe (SGD 1e-3, batch 4, 15
rounds x 100 steps), FedAvg with our tuned client rate (`fedavg_tuned`), the server optimisers FedAdam
and FedYogi (sites apply them to the decrypted average: `configs/strategy/fedadam.yaml`,
`fedyogi.yaml`), and DP-SGD at several ε (fedavg_tuned, RDP, δ = 1e-5). FLamby's protocol throughout:
4 centres, its train/test split, per-centre normalisation, logistic regression.

Reported: accuracy (FLamby's metric) on the pooled test set and the mean over the 4 centres' test
sets, next to FLamby's published figures where FLamby has one, plus the AUROC and Brier score of each
model on the pooled test set (the harness holds every test row in simulation). Mean ± population std
over seeds. Writes `results/reproduce_flamby_heart[-small].json` and `.md` with the commit.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtwin.core.config import compose_config
from medtwin.core.rundir import atomic_write_text

from .bench_fed_heart_disease import FLAMBY, git_commit
from .simulate import simulate

__all__ = ["PRESETS", "SETTINGS", "Setting", "main", "table_rows"]


@dataclass(frozen=True)
class Setting:
    label: str  # the federated row's name in the table
    overrides: tuple[str, ...]
    flamby: str = ""  # FLamby's row for the same recipe, if it has one


SETTINGS = (
    Setting("FedAvg (FLamby recipe)", ("strategy=fedavg",), flamby="federated fedavg"),
    Setting("FedProx (FLamby recipe)", ("strategy=fedprox",), flamby="federated fedprox"),
    Setting("FedAvg tuned (SGD 1e-2)", ("strategy=fedavg_tuned",)),
    Setting("FedAdam", ("strategy=fedadam",)),
    Setting("FedYogi", ("strategy=fedyogi",)),
    Setting("FedAvg tuned, DP ε=1", ("strategy=fedavg_tuned", "privacy=dp", "privacy.target_epsilon=1.0")),
    Setting("FedAvg tuned, DP ε=3", ("strategy=fedavg_tuned", "privacy=dp", "privacy.target_epsilon=3.0")),
    Setting("FedAvg tuned, DP ε=8", ("strategy=fedavg_tuned", "privacy=dp", "privacy.target_epsilon=8.0")),
)
PRESETS = {"full": (42, 43, 44, 45, 46), "small": (42,)}
BASELINE_LABELS = {"pooled": "Pooled training", "local:cleveland": "Cleveland alone", "local:hungarian": "Hungary alone",
                   "local:switzerland": "Switzerland alone", "local:va": "VA alone"}  # fmt: skip


def run_setting(setting: Setting, seed: int, runs_dir: Path) -> dict:
    """One simulation: its baselines table (with the federated row) and the pooled-test metrics of every model."""
    config = compose_config(["task=fed_heart_disease", f"seed={seed}", f"runs_dir={runs_dir}", "progress=false", *setting.overrides])
    summary = json.loads((simulate(config) / "summary.json").read_text(encoding="utf-8"))
    return summary["baselines"]


def _stat(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def table_rows(per_seed: dict[str, list[dict]]) -> list[dict]:
    """Rows of the table from each setting's baselines per seed: the baselines once (from the first
    setting's runs), then one federated row per setting."""
    rows: list[dict] = []
    first = next(iter(per_seed.values()))
    for name, label in BASELINE_LABELS.items():
        rows.append(_row(label, first, name, FLAMBY.get(name)))
    for label, runs in per_seed.items():
        setting = next(setting for setting in SETTINGS if setting.label == label)
        rows.append(_row(label, runs, "federated", FLAMBY.get(setting.flamby)))
    return rows


def _row(label: str, runs: list[dict], model: str, flamby: tuple[float, float] | None) -> dict:
    pooled_test = [run["pooled_test_metrics"][model] for run in runs]
    return {
        "model": label,
        "pooled_test_accuracy": _stat([run["rows"][model]["pooled_test"] for run in runs]),
        "mean_of_centres_accuracy": _stat([run["rows"][model]["mean_of_sites"] for run in runs]),
        "pooled_test_auroc": _stat([metrics["auroc"] for metrics in pooled_test]),
        "pooled_test_brier": _stat([metrics["brier"] for metrics in pooled_test]),
        "flamby_pooled_test_accuracy": flamby[0] if flamby else None,
        "flamby_mean_of_centres_accuracy": flamby[1] if flamby else None,
    }


def markdown(rows: list[dict], *, seeds: tuple[int, ...], commit: str, command: str) -> str:
    def cell(stat: dict) -> str:
        return f"{stat['mean']:.3f} ± {stat['std']:.3f}"

    def ref(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    lines = [
        f"Fed-Heart-Disease, FLamby's protocol, seeds {' '.join(map(str, seeds))}, commit `{commit}`: `{command}`",
        "",
        "| model | pooled test accuracy | FLamby | mean of 4 centres | FLamby | pooled test AUROC | pooled test Brier |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {cell(row['pooled_test_accuracy'])} | {ref(row['flamby_pooled_test_accuracy'])} | "
            f"{cell(row['mean_of_centres_accuracy'])} | {ref(row['flamby_mean_of_centres_accuracy'])} | "
            f"{cell(row['pooled_test_auroc'])} | {cell(row['pooled_test_brier'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medtwin.experiments.reproduce_flamby_heart", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full", help="full: 5 seeds; small: 1 seed (< 10 min on 2 cores)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="overrides the preset's seeds")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    seeds = tuple(args.seeds) if args.seeds else PRESETS[args.preset]
    started = time.monotonic()
    per_seed: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for setting in SETTINGS:
            for seed in seeds:
                baselines = run_setting(setting, seed, Path(scratch))
                per_seed.setdefault(setting.label, []).append(baselines)
                federated = baselines["rows"]["federated"]["pooled_test"]
                print(f"{setting.label}, seed {seed}: federated pooled-test accuracy {federated:.3f}", flush=True)
    rows = table_rows(per_seed)
    name = "reproduce_flamby_heart" + ("" if args.preset == "full" and not args.seeds else f"-{args.preset if not args.seeds else 'custom'}")
    command = "python -m medtwin.experiments.reproduce_flamby_heart" + ("" if args.preset == "full" else f" --preset {args.preset}")
    commit = git_commit()
    text = markdown(rows, seeds=seeds, commit=commit, command=command)
    text += f"\nwall time {time.monotonic() - started:.0f} s for {len(SETTINGS) * len(seeds)} simulations (2 cores)\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"{name}.md", text)
    atomic_write_text(
        args.out / f"{name}.json",
        json.dumps({"commit": commit, "command": command, "seeds": list(seeds), "rows": rows}, indent=1) + "\n",
    )  # fmt: skip
    print("\n" + text)


if __name__ == "__main__":
    main()
