"""Benchmark: CKKS bytes on the wire per parameter ÷ float32, for every shipped task's model and an MLP.

    python -m medtwin.experiments.bench_he_wire [--tasks fed_heart_disease ...] [--sites 4]
                                                [--features 64] [--hidden 512 128] [--out FILE]
                                                [--sizes 10000 10240 ...]

(`bench_he_round` runs this first, in the same process, and adds its figures to its JSON.)

For each model the parameters are the ones a run would use: a shipped task's come from
`he_parameters_for` (crypto=ckks defaults, the task's sites, max_total_examples from their data),
the MLP's from crypto=ckks with max_total_examples = 2 x its sites' rows, as in `bench_he_round`.
Every site encrypts a synthetic update (weights ~ U[-1, 1], n_i = max_total_examples / (2 x sites));
the coordinator loads and adds them with the public context only; a site decrypts the average.
Reported: one site's upload (ciphertext chunks, and with the record framing a run stores) and the
aggregate sent back, in bytes per parameter ÷ 4; the ring, primes and number of ciphertexts; the
measured max |decrypted - exact average| against the bound the run records, and its ratio. `--sizes`
adds models of those sizes (crypto=ckks defaults, `--sites` sites, max_total_examples 10,000): the
last ciphertext is partly empty, so the ratios depend on how full it is.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from medtwin.core.config import compose_config
from medtwin.core.he import (
    CkksParameters,
    average_error_bound,
    ckks_parameters_from_config,
    create_secret_context,
    decrypt_average,
    encrypt_update,
    load_context,
    serialize_public_context,
    serialize_secret_context,
    sum_encrypted,
)
from medtwin.core.model_vector import model_to_vector
from medtwin.core.protocol import chunks_to_record, record_bytes
from medtwin.core.rundir import atomic_write_text

SHIPPED_TASKS = ("fed_heart_disease", "breast_cancer", "diabetes_progression", "csv_example", "vitals")


@dataclass(frozen=True)
class WireRow:
    model: str
    num_parameters: int
    sites: int
    poly_modulus_degree: int
    coeff_mod_bit_sizes: list[int]
    scale_bits: int
    num_ciphertexts: int
    uplink_bytes: int  # one site's ciphertext chunks
    uplink_framed_bytes: int  # the same as the stored payload record (names, dtypes, lengths)
    downlink_bytes: int  # the encrypted aggregate
    measured_error: float  # max |decrypted average - exact average|
    error_bound: float  # what the run records for this total

    @property
    def uplink_ratio(self) -> float:
        return self.uplink_bytes / (4 * self.num_parameters)

    @property
    def uplink_framed_ratio(self) -> float:
        return self.uplink_framed_bytes / (4 * self.num_parameters)

    @property
    def downlink_ratio(self) -> float:
        return self.downlink_bytes / (4 * self.num_parameters)

    @property
    def error_to_bound(self) -> float:
        return self.measured_error / self.error_bound

    def to_dict(self) -> dict:
        ratios = {"uplink_ratio": self.uplink_ratio, "uplink_framed_ratio": self.uplink_framed_ratio}
        return asdict(self) | ratios | {"downlink_ratio": self.downlink_ratio, "error_to_bound": self.error_to_bound}


def measure_wire(model: str, params: CkksParameters, *, seed: int = 0) -> WireRow:
    secret = create_secret_context(params)
    site = load_context(serialize_secret_context(secret), expected_kind="secret")
    coordinator = load_context(serialize_public_context(secret), expected_kind="public")
    rng = np.random.default_rng(seed)
    sites = params.num_sites
    weights = [np.clip(rng.uniform(-1.0, 1.0, params.num_parameters), -params.max_abs_weight_bound, params.max_abs_weight_bound) for _ in range(sites)]
    count = max(1, params.max_total_examples // (2 * sites))
    updates = [encrypt_update(site, vector, count) for vector in weights]
    summed = sum_encrypted(coordinator, updates)
    average, total = decrypt_average(site, summed, params.num_parameters)
    exact = sum(weights) / sites
    return WireRow(
        model=model,
        num_parameters=params.num_parameters,
        sites=sites,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        scale_bits=params.scale_bits,
        num_ciphertexts=params.num_ciphertexts,
        uplink_bytes=sum(len(chunk) for chunk in updates[0]),
        uplink_framed_bytes=len(record_bytes(chunks_to_record(updates[0]))),
        downlink_bytes=sum(len(chunk) for chunk in summed),
        measured_error=float(np.max(np.abs(average - exact))),
        error_bound=average_error_bound(params, num_sites=sites, total_examples=total),
    )


def task_parameters(task_name: str) -> CkksParameters:
    """The CKKS parameters a simulated run of the shipped task would use."""
    from medtwin.core.tasks import get_task
    from medtwin.experiments.federation_setup import he_parameters_for

    config = compose_config([f"task={task_name}", "crypto=ckks"])
    return he_parameters_for(config, get_task(config.task))


def mlp_parameters(*, features: int, hidden: tuple[int, ...], sites: int, rows_per_site: int) -> CkksParameters:
    from medtwin.experiments.bench_round_workloads import build_model

    torch.manual_seed(0)
    num_parameters = int(model_to_vector(build_model(features=features, hidden=hidden)).size)
    crypto = replace(compose_config(["crypto=ckks"]).crypto, max_total_examples=2 * rows_per_site * sites)
    return ckks_parameters_from_config(crypto, num_parameters=num_parameters, num_sites=sites)


def wire_rows(*, tasks: list[str], features: int, hidden: tuple[int, ...], sites: int, rows_per_site: int) -> list[WireRow]:
    rows = [measure_wire(name, task_parameters(name)) for name in tasks]
    mlp = mlp_parameters(features=features, hidden=hidden, sites=sites, rows_per_site=rows_per_site)
    rows.append(measure_wire(f"MLP {features}-{'-'.join(map(str, hidden))}-1", mlp))
    return rows


def print_wire_table(rows: list[WireRow]) -> None:
    print("CKKS bytes on the wire per parameter ÷ 4 (float32); seeded symmetric encryption, one real per coefficient, bit-packed")
    header = (
        f"{'model':<22} {'params':>7} {'sites':>5} {'ring, primes':<18} {'ctxts':>5} {'uplink':>7} "
        f"{'framed':>7} {'downlink':>8} {'max err':>8} {'bound':>8} {'err/bnd':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        ring = f"{row.poly_modulus_degree} {row.coeff_mod_bit_sizes} 2^{row.scale_bits}"
        print(
            f"{row.model:<22} {row.num_parameters:>7} {row.sites:>5} {ring:<18} {row.num_ciphertexts:>5} "
            f"{row.uplink_ratio:>7.3f} {row.uplink_framed_ratio:>7.3f} {row.downlink_ratio:>8.3f} "
            f"{row.measured_error:>8.1e} {row.error_bound:>8.1e} {row.error_to_bound:>7.2f}"
        )


def add_wire_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", nargs="+", default=list(SHIPPED_TASKS))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_wire_arguments(parser)
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 128])
    parser.add_argument("--rows-per-site", type=int, default=3200)  # bench_he_round: 100 steps x batch 32
    parser.add_argument("--sizes", type=int, nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=Path(".medtwin/bench/he_wire.json"))
    args = parser.parse_args(argv)
    rows = wire_rows(
        tasks=args.tasks, features=args.features, hidden=tuple(args.hidden), sites=args.sites, rows_per_site=args.rows_per_site
    )
    crypto = replace(compose_config(["crypto=ckks"]).crypto, max_total_examples=10_000)
    for size in args.sizes:
        params = ckks_parameters_from_config(crypto, num_parameters=size, num_sites=args.sites)
        rows.append(measure_wire(f"{size} parameters", params))
    print_wire_table(rows)
    atomic_write_text(args.out, json.dumps({"wire": [row.to_dict() for row in rows]}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
