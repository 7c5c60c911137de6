"""What one DP step's Gaussian noise costs on this CPU, by generator, against a plain SGD step.

DP-SGD draws one Gaussian per trainable parameter every step; for the MLP 30 -> 256 -> 256 -> 1
(73,985 parameters, batch 64) that draw is a large part of the step. This bench times, on one thread,
interleaved, the median of `--repeats`:

- `torch`: what training used before — `Tensor.normal_` with a `torch.Generator` (MT19937, Box–Muller);
- `numpy-pcg64`, `numpy-sfc64`: numpy's ziggurat into a float32 buffer;
- `medtwin`: what DP training draws from since issue 12 — `client/privacy/noise.GaussianNoise`, an
  AES-256-CTR keystream (`cryptography`, AES-NI) turned into Gaussians by Box–Muller with numpy's SIMD
  float32 log / sqrt / cos / sin (a CSPRNG too);
- `plain step`: one plain SGD step of that MLP at batch 64 (forward, backward, `optimizer.step`).

It prints microseconds and each generator's cost as a fraction of the plain step, and writes JSON.
A DP step within 1.5x of the plain step leaves the noise at most 0.5 of a plain step for everything
DP adds (clipping included). Nothing here touches patient data.

    python -m medtwin.experiments.bench_noise [--repeats 400] [--out .medtwin/bench/noise.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medtwin.client.privacy.noise import GaussianNoise
from medtwin.core.rundir import atomic_write_text

PARAMETERS = 73_985  # MLP 30 -> 256 -> 256 -> 1


def _plain_step() -> Callable[[], None]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    features, targets = torch.randn(64, 30), (torch.rand(64) < 0.5).float()
    loss_fn = nn.BCEWithLogitsLoss()

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(model(features).reshape(-1), targets).backward()
        optimizer.step()

    return step


def candidates() -> dict[str, Callable[[], object]]:
    out = torch.empty(PARAMETERS)
    generator = torch.Generator().manual_seed(1)
    buffer = np.empty(PARAMETERS, dtype=np.float32)
    pcg64, sfc64 = np.random.Generator(np.random.PCG64()), np.random.Generator(np.random.SFC64())
    noise = GaussianNoise()
    return {
        "plain step": _plain_step(),
        "torch": lambda: out.normal_(0.0, 1.0, generator=generator),
        "numpy-pcg64": lambda: pcg64.standard_normal(out=buffer, dtype=np.float32),
        "numpy-sfc64": lambda: sfc64.standard_normal(out=buffer, dtype=np.float32),
        "medtwin": lambda: noise.fill_(out, 1.0),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path(".medtwin/bench/noise.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = candidates()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats + 1):  # interleaved; the first pass warms up
        for name, run in runs.items():
            started = time.process_time()
            run()
            samples[name].append(time.process_time() - started)
    micros = {name: statistics.median(values[1:]) * 1e6 for name, values in samples.items()}
    check = GaussianNoise().fill_(torch.empty(1_000_001), 2.0)  # the hand-made generator is a Gaussian: say so
    sanity = {"mean": float(check.mean()), "std": float(check.std()), "expected_std": 2.0}
    plain = micros["plain step"]
    print(f"{PARAMETERS:,} Gaussians (MLP 30-256-256-1) vs one plain step at batch 64, 1 thread, median of {args.repeats}")
    for name, value in micros.items():
        print(f"  {name:<20} {value:8.0f} us   {value / plain:5.2f} of a plain step   {value * 1e3 / PARAMETERS:5.1f} ns/value")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"parameters": PARAMETERS, "repeats": args.repeats, "us": micros, "medtwin_sanity": sanity}, indent=1) + "\n")
    print(f"  medtwin, 1,000,001 draws with std 2: mean {sanity['mean']:+.4f}, std {sanity['std']:.4f}")
    print(f"(written to {args.out})")


if __name__ == "__main__":
    main()
