"""Per-round wall time, deployment engine ÷ simulation engine, same config, measured in one run.

    python -m medtwin.experiments.bench_deployment [--rounds 3] [--out .medtwin/bench/deployment.json]

Deployment: `make deploy-demo`'s parties (TLS SuperLink with SuperNode auth, four SuperNodes as
separate process trees, both anvil chains; Fed-Heart-Disease, DP ε=3 + CKKS). Simulation: `medtwin
run` with the same task, strategy, privacy, crypto, chain and rounds. Each round's time is the sum of
its phases' `time_s` in metrics.jsonl; round 1 carries start-up (Ray, first imports), so the ratio
is over the later rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from medtwin.core.rundir import atomic_write_text

SIMULATION = [
    "task=fed_heart_disease", "strategy=fedavg_tuned", "privacy=dp", "privacy.target_epsilon=3.0", "crypto=ckks",
    "federation.min_sites=2", "chain=anvil", "chain.auth_port=0", "chain.data_port=0", "progress=false", "baselines.enabled=false",
]  # fmt: skip


def round_times(metrics: Path) -> list[float]:
    rounds: dict[int, float] = {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        rounds[record["round"]] = rounds.get(record["round"], 0.0) + float(record.get("time_s", 0.0))
    return [rounds[key] for key in sorted(rounds)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path(".medtwin/bench-deployment"))
    parser.add_argument("--out", type=Path, default=Path(".medtwin/bench/deployment.json"))
    args = parser.parse_args(argv)
    root = (args.root / time.strftime("%Y%m%d-%H%M%S")).resolve()
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "medtwin.experiments.deploy_demo", "--rounds", str(args.rounds), "--root", str(root / "deployment")], check=True)
    deployment_s = time.monotonic() - started
    (deployment_metrics,) = (root / "deployment").glob("*/runs/*/metrics.jsonl")
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "medtwin.experiments.cli", "run", *SIMULATION, f"federation.num_rounds={args.rounds}",
         f"chain.state_dir={root / 'simulation' / 'chain'}", f"runs_dir={root / 'simulation' / 'runs'}", "run_id=bench-simulation"],
        check=True,
    )  # fmt: skip
    simulation_s = time.monotonic() - started
    subprocess.run([sys.executable, "-m", "medtwin.experiments.cli", "chain", "down", "--state-dir", str(root / "simulation" / "chain")], check=False)
    deployed, simulated = round_times(deployment_metrics), round_times(root / "simulation" / "runs" / "bench-simulation" / "metrics.jsonl")
    later = slice(1, None) if args.rounds > 1 else slice(None)
    ratio = statistics.median(deployed[later]) / statistics.median(simulated[later])
    result = {
        "rounds": args.rounds,
        "deployment_round_s": deployed,
        "simulation_round_s": simulated,
        "ratio_later_rounds_median": ratio,
        "deployment_whole_s": deployment_s,
        "simulation_whole_s": simulation_s,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"per round (s): deployment {[round(s, 2) for s in deployed]}, simulation {[round(s, 2) for s in simulated]}")
    print(f"deployment ÷ simulation, median of rounds 2..{args.rounds}: {ratio:.1f}×  (written to {args.out})")


if __name__ == "__main__":
    main()
