"""Benchmark: DP-SGD step time / plain step time, same model and data, in one process.

    python -m medtwin.experiments.bench_dp_step [--local-steps 100] [--repeats 7]
        [--modes bookkeeping ew hooks ghost functorch] [--out .medtwin/bench/dp_step.json]

Workloads: a Fed-Heart-Disease-like logistic regression (13 -> 1, sigmoid, 200 rows), a 30 -> 64 -> 1
MLP (455 rows, like breast-cancer's train split), an MLP 30 -> 256 -> 256 -> 1 (74k parameters) and
the vital-signs twin (default window shape; DP per patient: 8 windows of each of ~8 sampled patients
per step of 64 windows, as the twin trains). For each it times a whole local round (`train_locally` vs
`train_locally_dp`, `--local-steps` steps each, setup included: model validation, hooks, optimizer)
and prints microseconds per step and the DP / plain ratio for every clipping path (and, on a second line,
the ratio to plain SGD on the data cut to whole batches: the plain round's last batch of an epoch is
short, so its mean batch is below `batch` rows, while a DP step's expected batch is `batch` rows): medtwin's
book-keeping clipping (`grad_sample_mode=bookkeeping`, the default) and Opacus's `grad_sample_mode`s,
plus Opacus's own ghost clipping (`ghost`: `GradSampleModuleFastGradientClipping` with its
`DPOptimizerFastGradientClipping`, two backward passes; rows only, it has no per-patient averaging).
Runs are interleaved and the median of `--repeats` is kept, because the machine is shared. One thread,
as in the ClientApp. Synthetic data: no patient data is touched.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from medtwin.client.privacy import train_locally_dp
from medtwin.client.privacy.dp_training import dp_units_per_step
from medtwin.client.training import train_locally
from medtwin.core.config.task import VitalsConfig
from medtwin.core.privacy_math import sample_rate_for
from medtwin.core.rundir import atomic_write_text
from medtwin.core.tasks.models import FlatBCELoss, logistic_regression, mlp
from medtwin.core.tasks.vitals.model import GaussianForecastLoss, VitalsForecaster
from medtwin.core.tasks.vitals_task import window_shape

MODES = ("bookkeeping", "ew", "hooks", "ghost", "functorch")
UNIT_ROWS = 8  # the twin's privacy.unit_rows default


@dataclass(frozen=True)
class Workload:
    name: str
    build_model: Callable[[], nn.Module]
    make_loss: Callable[[], nn.Module]
    data: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray, np.ndarray | None]]  # x, y, patient of each row
    batch_sizes: tuple[int, ...]


def _binary(num_rows: int, num_features: int) -> Callable:
    def make(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, None]:
        x = rng.normal(size=(num_rows, num_features)).astype(np.float32)
        return x, (rng.random(num_rows) < 0.5).astype(np.float32), None

    return make


def _windows(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows shaped like the twin's (values and masks), 42 training patients of ~60 windows each."""
    shape = window_shape(VitalsConfig())
    patients = np.repeat(np.arange(42), 60)
    x = rng.normal(size=(len(patients), shape.input_width)).astype(np.float32)
    x.reshape(len(patients), shape.window_steps, 2, -1)[:, :, 1] = rng.random((len(patients), shape.window_steps, x.shape[1] // shape.window_steps // 2)) < 0.8
    y = np.concatenate([rng.normal(size=(len(patients), shape.target_width)), rng.random((len(patients), shape.target_width)) < 0.8], 1)
    return x, y.astype(np.float32), patients


WORKLOADS = (
    Workload("logreg 13->1", lambda: logistic_regression(13), FlatBCELoss, _binary(200, 13), (4, 64)),
    Workload("mlp 30->64->1", lambda: mlp(30, hidden_units=64, sigmoid_output=True), FlatBCELoss, _binary(455, 30), (4, 64)),
    Workload(
        "mlp 30->256->256->1",
        lambda: nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1), nn.Sigmoid()),
        FlatBCELoss, _binary(455, 30), (64,),
    ),
    Workload(
        "vitals twin", lambda: VitalsForecaster(window_shape(VitalsConfig())),
        lambda: GaussianForecastLoss(window_shape(VitalsConfig()).target_width), _windows, (64,),
    ),
)


def _ghost_round(model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int, local_steps: int, make_loss: Callable) -> None:
    """Opacus's own ghost clipping (rows as units, Poisson batches) with the same SGD settings."""
    criterion = make_loss()  # Opacus switches it to per-sample losses itself
    wrapped = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean", max_grad_norm=1.0)
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0,
        expected_batch_size=batch_size, loss_reduction="mean",
    )
    loss_fn = DPLossFastGradientClipping(wrapped, optimizer, criterion, loss_reduction="mean")
    features, targets = torch.from_numpy(x), torch.from_numpy(y)
    rng = np.random.default_rng(1)
    rate = sample_rate_for(batch_size=batch_size, num_train=len(x))
    for _ in range(local_steps):
        index = torch.from_numpy(np.flatnonzero(rng.random(len(x)) < rate))
        loss = loss_fn(wrapped(features[index]).reshape(-1), targets[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    wrapped._close()


def _time_round(train: Callable[[nn.Module], object], build_model: Callable[[], nn.Module], steps: int) -> float:
    torch.manual_seed(0)
    model = build_model()
    start = time.process_time()
    train(model)
    return (time.process_time() - start) / steps


def bench(workload: Workload, *, batch_size: int, local_steps: int, repeats: int, modes: tuple[str, ...]) -> dict:
    x, y, patients = workload.data(np.random.default_rng(0))
    common = {
        "local_steps": local_steps,
        "batch_size": batch_size,
        "optimizer_name": "sgd",
        "learning_rate": 0.01,
        "seed": 1,
    }
    full = len(x) // batch_size * batch_size  # plain SGD whose every batch has batch_size rows (no short last batch)
    runners: dict[str, Callable[[nn.Module], object]] = {
        "plain": lambda model: train_locally(model, x, y, loss_fn=workload.make_loss(), **common),
        "plain_full_batches": lambda model: train_locally(model, x[:full], y[:full], loss_fn=workload.make_loss(), **common),
    }
    for mode in modes:
        if mode == "ghost":
            if patients is None:  # Opacus's ghost clipping has no per-patient averaging
                runners[mode] = lambda model: _ghost_round(
                    model, x, y, batch_size=batch_size, local_steps=local_steps, make_loss=workload.make_loss
                )
            continue
        runners[mode] = lambda model, mode=mode: train_locally_dp(
            model, x, y, loss_fn=workload.make_loss(), **common, noise_multiplier=1.0, max_grad_norm=1.0,
            grad_sample_mode=mode, units=patients, unit_rows=UNIT_ROWS,
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
    units_per_step = dp_units_per_step(batch_size=batch_size, unit_rows=UNIT_ROWS, grouped=patients is not None)
    return {
        "model": workload.name,
        "batch": batch_size,
        "parameters": sum(p.numel() for p in workload.build_model().parameters()),
        "units_per_step": units_per_step,
        "us_per_step": {name: value * 1e6 for name, value in medians.items()},
        "ratio_to_plain": {name: value / medians["plain"] for name, value in medians.items() if not name.startswith("plain")},
        # the plain round's mean batch is len(x) / ceil(len(x) / batch) rows (455 rows, batch 64: 56.9), a DP step's
        # expected batch is batch rows: the same ratios against plain steps of exactly `batch` rows
        "plain_rows_per_step": len(x) / -(-len(x) // batch_size),
        "ratio_to_plain_full_batches": {
            name: value / medians["plain_full_batches"] for name, value in medians.items() if not name.startswith("plain")
        },
        "failures": failures,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", type=Path, default=Path(".medtwin/bench/dp_step.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)
    modes = tuple(args.modes)
    header = f"{'model':<20} {'batch':>5} {'plain us/step':>13} " + " ".join(f"{m + ' us (x)':>18}" for m in modes)
    print(header)
    print("-" * len(header))
    rows = []
    for workload in WORKLOADS:
        for batch_size in workload.batch_sizes:
            row = bench(workload, batch_size=batch_size, local_steps=args.local_steps, repeats=args.repeats, modes=modes)
            rows.append(row)
            cells = []
            for mode in modes:
                if mode in row["failures"]:
                    cells.append(f"{'failed':>18}")
                elif mode not in row["ratio_to_plain"]:
                    cells.append(f"{'n/a':>18}")
                else:
                    cells.append(f"{row['us_per_step'][mode]:>10.0f} ({row['ratio_to_plain'][mode]:4.2f}x)")
            print(f"{workload.name:<20} {batch_size:>5} {row['us_per_step']['plain']:>13.0f} " + " ".join(cells), flush=True)
            full = row["ratio_to_plain_full_batches"]
            print(
                f"{'  vs full batches':<20} {'':>5} {row['us_per_step']['plain_full_batches']:>13.0f} "
                + " ".join(f"{'':>10} ({full[mode]:4.2f}x)" if mode in full else f"{'':>18}" for mode in modes)
                + f"   (plain round: {row['plain_rows_per_step']:.1f} rows/step)",
                flush=True,
            )
            for mode, failure in row["failures"].items():
                print(f"    {mode} failed: {failure}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"local_steps": args.local_steps, "repeats": args.repeats, "rows": rows}, indent=1) + "\n")
    print(f"(written to {args.out})")


if __name__ == "__main__":
    main()
