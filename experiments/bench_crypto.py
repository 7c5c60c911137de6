"""Benchmark: CKKS aggregation cost and accuracy for one model size and a few federation sizes.

    python -m medtwin.experiments.bench_crypto [--num-parameters 100000] [--sites 4 8]
                                               [--targets 1e-5 1e-3] [--repeats 3]

For each number of sites k and precision target it chooses parameters with
`choose_ckks_parameters` (bounds: |w| <= 1, sum n_i <= 1000 k), encrypts k synthetic updates
[n_i w_i ..., n_i] (weights ~ N(0, 0.25) clipped to [-1, 1], n_i ~ U[200, 1000)), adds them with the
public context only, decrypts the average, and reports: bytes on the wire per parameter / 4 (one
site's upload; the aggregate sent back has the same size), encrypt time per site, sum time,
decrypt time, the max |encrypted average - plaintext average| relative to the largest weight, and
the bound predicted for that total. A reference row uses TenSEAL's tutorial default (N = 8192,
[60, 40, 40, 60], scale 2^40, public-key encryption). Times are medians of `--repeats` on a
shared 2-core machine. Synthetic data only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from medtwin.core.he import (
    average_error_bound,
    choose_ckks_parameters,
    create_secret_context,
    decrypt_average,
    encrypt_update,
    serialize_public_context,
    sum_encrypted,
)

WEIGHT_BOUND = 1.0
MAX_EXAMPLES_PER_SITE = 1000


@dataclass(frozen=True)
class Row:
    label: str
    sites: int
    ratio: float  # bytes per parameter / 4
    encrypt_s: float
    sum_s: float
    decrypt_s: float
    relative_error: float
    predicted: float  # relative bound for this run's total, nan for the reference


def _median_time(action: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _workload(num_parameters: int, sites: int, seed: int) -> tuple[list[np.ndarray], list[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = [np.clip(rng.normal(0.0, 0.25, num_parameters), -WEIGHT_BOUND, WEIGHT_BOUND) for _ in range(sites)]
    counts = [int(count) for count in rng.integers(200, MAX_EXAMPLES_PER_SITE, sites)]
    average = sum(w * n for w, n in zip(weights, counts)) / sum(counts)
    return weights, counts, average


def bench_medtwin(num_parameters: int, sites: int, target: float, repeats: int) -> Row:
    params = choose_ckks_parameters(
        num_parameters=num_parameters,
        num_sites=sites,
        max_relative_error=target,
        max_abs_weight_bound=WEIGHT_BOUND,
        max_total_examples=MAX_EXAMPLES_PER_SITE * sites,
    )
    secret = create_secret_context(params)
    public = serialize_public_context(secret)
    weights, counts, expected = _workload(num_parameters, sites, seed=sites)
    encrypt_s, _ = _median_time(lambda: encrypt_update(secret, weights[0], counts[0]), repeats)
    updates = [encrypt_update(secret, w, n) for w, n in zip(weights, counts)]
    sum_s, summed = _median_time(lambda: sum_encrypted(public, updates), repeats)
    decrypt_s, (average, total) = _median_time(lambda: decrypt_average(secret, summed, num_parameters), repeats)
    largest = float(np.max(np.abs(expected)))
    bound = average_error_bound(params, num_sites=sites, total_examples=total) / largest
    label = f"auto {target:g}: N={params.poly_modulus_degree} {list(params.coeff_mod_bit_sizes)} 2^{params.scale_bits}"
    return Row(
        label=label,
        sites=sites,
        ratio=sum(len(chunk) for chunk in updates[0]) / num_parameters / 4,
        encrypt_s=encrypt_s,
        sum_s=sum_s,
        decrypt_s=decrypt_s,
        relative_error=float(np.max(np.abs(average - expected))) / largest,
        predicted=bound,
    )


def bench_tenseal_default(num_parameters: int, sites: int, repeats: int) -> Row:
    context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    context.global_scale = 2.0**40
    slots = 4096
    public = ts.context_from(context.serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=False))
    weights, counts, expected = _workload(num_parameters, sites, seed=sites)

    def encrypt(w: np.ndarray, n: int) -> list[bytes]:
        packed = np.append(w * n, float(n))
        return [ts.ckks_vector(context, packed[i : i + slots].tolist()).serialize() for i in range(0, packed.size, slots)]

    def add(updates: list[list[bytes]]) -> list[ts.CKKSVector]:
        totals = [ts.ckks_vector_from(public, chunk) for chunk in updates[0]]
        for update in updates[1:]:
            for total, chunk in zip(totals, update):
                total.add_(ts.ckks_vector_from(public, chunk))
        return totals

    def decrypt(totals: list[ts.CKKSVector]) -> np.ndarray:
        packed = np.concatenate([ts.ckks_vector_from(context, total.serialize()).decrypt() for total in totals])
        return packed[:-1] / packed[-1]

    encrypt_s, _ = _median_time(lambda: encrypt(weights[0], counts[0]), repeats)
    updates = [encrypt(w, n) for w, n in zip(weights, counts)]
    sum_s, totals = _median_time(lambda: add(updates), repeats)
    decrypt_s, average = _median_time(lambda: decrypt(totals), repeats)
    largest = float(np.max(np.abs(expected)))
    return Row(
        label="TenSEAL default: N=8192 [60, 40, 40, 60] 2^40",
        sites=sites,
        ratio=sum(len(chunk) for chunk in updates[0]) / num_parameters / 4,
        encrypt_s=encrypt_s,
        sum_s=sum_s,
        decrypt_s=decrypt_s,
        relative_error=float(np.max(np.abs(average - expected))) / largest,
        predicted=float("nan"),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-parameters", type=int, default=100_000)
    parser.add_argument("--sites", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--targets", type=float, nargs="+", default=[1e-5, 1e-3])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    header = (
        f"{'parameters':<46} {'sites':>5} {'bytes/4':>7} {'enc s':>6} {'sum s':>6} {'dec s':>6} "
        f"{'rel err':>8} {'bound':>8}"
    )
    print(f"CKKS aggregation of a {args.num_parameters}-parameter model")
    print(header)
    print("-" * len(header))
    for sites in args.sites:
        rows = [bench_medtwin(args.num_parameters, sites, target, args.repeats) for target in args.targets]
        rows.append(bench_tenseal_default(args.num_parameters, sites, args.repeats))
        for row in rows:
            print(
                f"{row.label:<46} {row.sites:>5} {row.ratio:>7.2f} {row.encrypt_s:>6.3f} {row.sum_s:>6.3f} "
                f"{row.decrypt_s:>6.3f} {row.relative_error:>8.1e} {row.predicted:>8.1e}"
            )


if __name__ == "__main__":
    main()
