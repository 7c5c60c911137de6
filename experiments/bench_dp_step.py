"""Benchmark: DP-SGD step time / plain step time, same model and data, in one process.

    python -m experiments.bench_dp_step [--local-steps 100] [--repeats 7] [--modes hooks ew functorch]

For a Fed-Heart-Disease-like logistic regression (13 -> 1, sigmoid, 200 rows) and a 30 -> 64 -> 1
MLP (455 rows, like breast-cancer's train split), at batch 4 and 64, it times a whole local round
(`train_locally` vs `train_locally_dp`, `--local-steps` steps each, setup included: Opacus model
validation, hooks, optimizer) and prints microseconds per step and the DP / plain ratio for every
Opacus `grad_sample_mode`. Runs are interleaved and the median of `--repeats` is kept, because the
machine is shared. One thread, as in the ClientApp. Synthetic data: no patient data is touched.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medtwin.client.privacy import train_locally_dp
from medtwin.client.training import train_locally
from medtwin.core.tasks.models import FlatBCELoss, logistic_regression, mlp

MODES = ("hooks", "ew", "functorch")


@dataclass(frozen=True)
class Workload:
    name: str
    build_model: Callable[[], nn.Module]
    num_features: int
    num_rows: int


WORKLOADS = (
    Workload("logreg 13->1", lambda: logistic_regression(13), 13, 200),
    Workload("mlp 30->64->1", lambda: mlp(30, hidden_units=64, sigmoid_output=True), 30, 455),
)


def _time_round(train: Callable[[nn.Module], object], build_model: Callable[[], nn.Module], steps: int) -> float:
    torch.manual_seed(0)
    model = build_model()
    start = time.process_time()
    train(model)
    return (time.process_time() - start) / steps


def bench(workload: Workload, *, batch_size: int, local_steps: int, repeats: int, modes: tuple[str, ...]) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(workload.num_rows, workload.num_features)).astype(np.float32)
    y = (rng.random(workload.num_rows) < 0.5).astype(np.float32)
    common = {
        "loss_fn": FlatBCELoss(),
        "local_steps": local_steps,
        "batch_size": batch_size,
        "optimizer_name": "sgd",
        "learning_rate": 0.01,
        "seed": 1,
    }
    runners: dict[str, Callable[[nn.Module], object]] = {"plain": lambda model: train_locally(model, x, y, **common)}
    for mode in modes:
        runners[mode] = lambda model, mode=mode: train_locally_dp(
            model, x, y, **common, noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode
        )
    samples: dict[str, list[float]] = {name: [] for name in runners}
    failures: dict[str, str] = {}
    for _ in range(repeats + 1):  # the first pass warms up (imports, allocator) and is dropped
        for name, runner in runners.items():
            if name in failures:
                continue
            try:
                samples[name].append(_time_round(runner, workload.build_model, local_steps))
            except Exception as error:  # noqa: BLE001 - a mode that fails is reported, not fatal
                failures[name] = f"{type(error).__name__}: {error}"[:60]
    medians = {name: statistics.median(values[1:]) for name, values in samples.items() if name not in failures}
    return {"medians": medians, "failures": failures}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)
    modes = tuple(args.modes)
    header = f"{'model':<15} {'batch':>5} {'plain us/step':>13} " + " ".join(f"{m + ' us (x)':>18}" for m in modes)
    print(header)
    print("-" * len(header))
    for workload in WORKLOADS:
        for batch_size in (4, 64):
            result = bench(
                workload, batch_size=batch_size, local_steps=args.local_steps, repeats=args.repeats, modes=modes
            )
            plain = result["medians"]["plain"]
            cells = []
            for mode in modes:
                if mode in result["failures"]:
                    cells.append(f"{'failed':>18}")
                else:
                    value = result["medians"][mode]
                    cells.append(f"{value * 1e6:>10.0f} ({value / plain:4.2f}x)")
            print(f"{workload.name:<15} {batch_size:>5} {plain * 1e6:>13.0f} " + " ".join(cells))
            for mode, failure in result["failures"].items():
                print(f"    {mode} failed: {failure}")


if __name__ == "__main__":
    main()
