"""Benchmark: what CKKS costs a whole federated round, for a ~100k-parameter model and 4 / 8 sites.

    python -m medtwin.experiments.bench_he_round [--sites 4 8] [--hidden 512 128] [--features 64]
                                                 [--local-steps 100] [--batch-size 32] [--rounds 3]
                                                 [--tasks ...] [--wire-only] [--out .medtwin/bench/he_round.json]

First, in the same run, the bytes on the wire (`bench_he_wire`): uplink and downlink per parameter
÷ float32 for every shipped task's model and this MLP (with the first `--sites`). Then the rounds.
Both are printed and written to `--out` as JSON.

A round is built from the pieces the real round loop runs, in the same order:

    site         decode the previous aggregate (decrypt with CKKS) -> local training (`train_locally`,
                 SGD, `--local-steps` steps of `--batch-size`) -> pack (encrypt + sign + keep own update)
    coordinator  for each update: verify the signed claim, check (payload / ciphertext shape) + store it as an
                 artifact; sum (CKKS: public context only); store the aggregate
    site         decode the new aggregate for the evaluation phase

Sites work in parallel in a real federation, so the round time is the critical path: the slowest
site's decode + train + pack, the coordinator's serial work, the slowest site's decode. Sites are
timed one after another here (2 shared cores), each on its own synthetic data (64 features,
`--local-steps` x `--batch-size` rows, a random linear rule). Network transfer is not timed; the
bytes column says how much one site uploads (the aggregate sent back is about twice that under CKKS).
"plain" is crypto=plain (float32 updates, float64 sums; signed and verified like every update); "ckks" uses the project's crypto=ckks
defaults (configs/crypto/ckks.yaml, max_total_examples = 2 x the sites' rows as in simulation).
Times are medians over `--rounds` timed rounds after one warm-up round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from medtwin.client.codec import CkksSiteCodec, PlainSiteCodec
from medtwin.client.training import train_locally
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config import compose_config
from medtwin.core.he import CkksParameters, ckks_parameters_from_config
from medtwin.core.identity import (
    ReplyClaim,
    SiteKit,
    init_site_identity,
    install_he_secret,
    join_federation,
    provision_federation,
    sign_claim,
    steward_generate_he_keys,
)
from medtwin.core.model_vector import model_to_vector, vector_to_model
from medtwin.core.protocol import payload_sha256, record_bytes, site_reply_record
from medtwin.core.rundir import atomic_write_text
from medtwin.experiments.bench_he_wire import add_wire_arguments, print_wire_table, wire_rows
from medtwin.server.aggregation import Aggregator, CkksAggregator, PlainAggregator, SiteUpdate
from medtwin.server.verifier import ReplyVerifier

RUN_ID = "bench-he-round"
T = TypeVar("T")


@dataclass(frozen=True)
class RoundTiming:
    decode_s: float  # slowest site: decode the previous aggregate (train phase)
    train_s: float  # slowest site: local training
    pack_s: float  # slowest site: pack (CKKS: encrypt, sign, keep its plaintext update)
    coordinator_s: float  # check + store every update, sum, store the aggregate
    evaluate_decode_s: float  # slowest site: decode the new aggregate (evaluation phase)
    one_machine_s: float  # everything one after another (one host simulating every site)
    upload_bytes: int  # one site's update payload
    relative_error: float = 0.0  # max |decoded average - exact average| / max |exact average|

    @property
    def round_s(self) -> float:
        return self.decode_s + self.train_s + self.pack_s + self.coordinator_s + self.evaluate_decode_s


@dataclass(frozen=True)
class Row:
    sites: int
    num_parameters: int
    plain: RoundTiming
    ckks: RoundTiming
    parameters: CkksParameters

    @property
    def ratio(self) -> float:
        return self.ckks.round_s / self.plain.round_s

    @property
    def bytes_per_parameter_over_4(self) -> float:
        return self.ckks.upload_bytes / self.num_parameters / 4


def build_model(*, features: int, hidden: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    width = features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def _timed(action: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


def _site_data(index: int, *, rows: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([7, index])
    x = rng.normal(0.0, 1.0, (rows, features)).astype(np.float32)
    rule = np.random.default_rng(7).normal(0.0, 1.0, features)
    y = (x @ rule + rng.normal(0.0, 0.5, rows) > 0).astype(np.float32)
    return x, y


def _federation(root: Path, *, scheme: str, sites: int, num_parameters: int, rows_per_site: int):
    """Every site makes its own identity, the admin provisions from public files; CKKS keys from site 0."""
    site_ids = [f"site{index}" for index in range(sites)]
    kit_dirs = {site_id: root / site_id / "kit" for site_id in site_ids}
    public_files = [init_site_identity(kit_dirs[site_id], site_id=site_id) for site_id in site_ids]
    admin = provision_federation(root / "admin", federation_name="bench", site_public_files=public_files)
    kits = [join_federation(kit_dirs[site_id], admin.manifest_path) for site_id in site_ids]
    if scheme != "ckks":
        return site_ids, kits, [PlainSiteCodec() for _ in site_ids], PlainAggregator, admin.manifest, None
    crypto = compose_config(["crypto=ckks"]).crypto
    crypto = replace(crypto, max_total_examples=2 * rows_per_site * sites)
    parameters = ckks_parameters_from_config(crypto, num_parameters=num_parameters, num_sites=sites)
    distribution = steward_generate_he_keys(kit_dirs[site_ids[0]], parameters, outbox_dir=root / "outbox")
    for site_id, envelope in distribution.envelope_paths.items():
        install_he_secret(kit_dirs[site_id], envelope)
    codecs = [CkksSiteCodec.from_kit(kit_dirs[site_id], distribution.key_id) for site_id in site_ids]

    def make_aggregator() -> Aggregator:
        return CkksAggregator.from_files(public_context_path=str(distribution.public_context_path))

    return site_ids, kits, codecs, make_aggregator, admin.manifest, parameters


def _signed_update(codec, kit: SiteKit, weights: np.ndarray, *, num_examples: int, server_round: int):
    """What a site sends: the packed payload and its signed claim (both schemes are signed)."""
    record = codec.pack(weights, num_examples=num_examples, run_id=RUN_ID)
    claim = ReplyClaim(
        kind="update", run_id=RUN_ID, server_round=server_round, site_id=kit.site_id,
        payload_sha256=payload_sha256(record), num_examples=int(num_examples), status="trained",
    )  # fmt: skip
    return record, site_reply_record(claim, sign_claim(kit.signing_key, claim))


def run_rounds(
    *,
    scheme: str,
    sites: int,
    features: int,
    hidden: tuple[int, ...],
    local_steps: int,
    batch_size: int,
    rounds: int,
    workdir: Path,
) -> tuple[RoundTiming, CkksParameters | None, int]:
    """Warm-up round + `rounds` timed rounds; returns the median timing, the CKKS parameters, model size."""
    torch.manual_seed(0)
    initial = model_to_vector(build_model(features=features, hidden=hidden))
    num_parameters = int(initial.size)
    rows = local_steps * batch_size
    data = [_site_data(index, rows=rows, features=features) for index in range(sites)]
    site_ids, kits, codecs, make_aggregator, manifest, parameters = _federation(
        workdir, scheme=scheme, sites=sites, num_parameters=num_parameters, rows_per_site=rows
    )
    aggregator = make_aggregator()
    verifier = ReplyVerifier(manifest, run_id=RUN_ID)
    artifacts = ArtifactStore(workdir / "artifacts")
    aggregate = None
    timings = []
    for server_round in range(1, rounds + 2):
        decode, train, pack, evaluate, updates, weighted = [], [], [], [], [], []
        for index, codec in enumerate(codecs):
            model = build_model(features=features, hidden=hidden)
            if aggregate is None:
                decode.append(0.0)
                vector_to_model(model, initial)
            else:
                seconds, (average, _) = _timed(lambda: codec.average(aggregate))
                decode.append(seconds)
                vector_to_model(model, average)
            x, y = data[index]
            seconds, result = _timed(
                lambda: train_locally(
                    model, x, y, loss_fn=nn.BCEWithLogitsLoss(), local_steps=local_steps, batch_size=batch_size,
                    optimizer_name="sgd", learning_rate=0.01, seed=server_round * 1000 + index,
                )
            )
            train.append(seconds)
            seconds, (record, site_record) = _timed(
                lambda: _signed_update(
                    codec, kits[index], model_to_vector(model), num_examples=result.num_examples, server_round=server_round
                )
            )
            pack.append(seconds)
            weighted.append((model_to_vector(model) * result.num_examples, result.num_examples))
            updates.append((index + 1, record, site_record))

        def coordinate():
            accepted = []
            for node_id, record, site_record in updates:
                verified = verifier.verify(
                    site_record, node_id=node_id, kind="update", server_round=server_round, payload_sha256=payload_sha256(record)
                )
                update = SiteUpdate(node_id=node_id, record=record, claim=verified.claim, signature=verified.signature)
                problem = aggregator.check(update)
                if problem:
                    raise RuntimeError(f"benchmark update rejected: {problem}")
                aggregator.accept(update)
                verifier.accept(verified)
                artifacts.put(record_bytes(record), kind="update")
                accepted.append(update)
            summed = aggregator.aggregate(accepted)
            artifacts.put(record_bytes(summed), kind="aggregate")
            return summed

        coordinator_s, aggregate = _timed(coordinate)
        exact = sum(vector for vector, _ in weighted) / sum(count for _, count in weighted)
        errors = []
        for codec in codecs:
            seconds, (average, _) = _timed(lambda: codec.average(aggregate))
            evaluate.append(seconds)
            errors.append(float(np.max(np.abs(average - exact)) / np.max(np.abs(exact))))
        timing = RoundTiming(
            decode_s=max(decode),
            train_s=max(train),
            pack_s=max(pack),
            coordinator_s=coordinator_s,
            evaluate_decode_s=max(evaluate),
            one_machine_s=sum(decode) + sum(train) + sum(pack) + coordinator_s + sum(evaluate),
            upload_bytes=sum(len(array.data) for array in updates[0][1].values()),
            relative_error=max(errors),
        )
        if server_round > 1:  # round 1 has no aggregate to decode and warms caches up
            timings.append(timing)
    return _median_timing(timings), parameters, num_parameters


def _median_timing(timings: list[RoundTiming]) -> RoundTiming:
    def median(name: str) -> float:
        return statistics.median(getattr(timing, name) for timing in timings)

    return RoundTiming(
        decode_s=median("decode_s"),
        train_s=median("train_s"),
        pack_s=median("pack_s"),
        coordinator_s=median("coordinator_s"),
        evaluate_decode_s=median("evaluate_decode_s"),
        one_machine_s=median("one_machine_s"),
        upload_bytes=timings[-1].upload_bytes,
        relative_error=max(timing.relative_error for timing in timings),
    )


def bench(*, sites: int, features: int, hidden: tuple[int, ...], local_steps: int, batch_size: int, rounds: int) -> Row:
    common = {
        "sites": sites, "features": features, "hidden": hidden, "local_steps": local_steps,
        "batch_size": batch_size, "rounds": rounds,
    }
    with tempfile.TemporaryDirectory(prefix="medtwin-bench-he-") as tmp:
        plain, _, num_parameters = run_rounds(scheme="plain", workdir=Path(tmp) / "plain", **common)
        ckks, parameters, _ = run_rounds(scheme="ckks", workdir=Path(tmp) / "ckks", **common)
    assert parameters is not None
    return Row(sites=sites, num_parameters=num_parameters, plain=plain, ckks=ckks, parameters=parameters)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 128])
    parser.add_argument("--local-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    add_wire_arguments(parser)
    parser.add_argument("--wire-only", action="store_true", help="measure bytes on the wire only, no timed rounds")
    parser.add_argument("--out", type=Path, default=Path(".medtwin/bench/he_round.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as each site does (client/app.py)
    wire = wire_rows(
        tasks=args.tasks, features=args.features, hidden=tuple(args.hidden), sites=args.sites[0],
        rows_per_site=args.local_steps * args.batch_size,
    )  # fmt: skip
    print_wire_table(wire)
    results: dict = {"wire": [row.to_dict() for row in wire], "rounds": []}
    if args.wire_only:
        atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.out}")
        return
    rows = [
        bench(
            sites=sites, features=args.features, hidden=tuple(args.hidden), local_steps=args.local_steps,
            batch_size=args.batch_size, rounds=args.rounds,
        )
        for sites in args.sites
    ]
    first = rows[0]
    print(
        f"One federated round, {first.num_parameters} parameters (MLP {args.features}-{'-'.join(map(str, args.hidden))}-1), "
        f"{args.local_steps} SGD steps of {args.batch_size} per site; medians of {args.rounds} rounds"
    )
    header = (
        f"{'sites':>5} {'plain round s':>13} {'enc round s':>11} {'ratio':>6} {'bytes/param/4':>13} "
        f"{'train s':>7} {'enc+sign s':>10} {'coord s':>14} {'decrypt s':>9} {'1-host ratio':>12} {'rel err':>7}  CKKS parameters"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        p = row.parameters
        print(
            f"{row.sites:>5} {row.plain.round_s:>13.3f} {row.ckks.round_s:>11.3f} {row.ratio:>6.2f} "
            f"{row.bytes_per_parameter_over_4:>13.2f} {row.ckks.train_s:>7.3f} {row.ckks.pack_s:>10.3f} "
            f"{row.plain.coordinator_s:>6.3f}/{row.ckks.coordinator_s:<7.3f} {row.ckks.evaluate_decode_s:>9.3f} "
            f"{row.ckks.one_machine_s / row.plain.one_machine_s:>12.2f} {row.ckks.relative_error:>7.1e}  "
            f"N={p.poly_modulus_degree} {list(p.coeff_mod_bit_sizes)} 2^{p.scale_bits}, {p.num_ciphertexts} ciphertexts, "
            f"full-scale bound {p.predicted_error_bound:.1e} (|w| <= {p.max_abs_weight_bound:g}, sum n <= {p.max_total_examples})"
        )
    plain_ratio = first.plain.upload_bytes / first.num_parameters / 4
    print(
        f"plain bytes/param/4 = {plain_ratio:.2f} (float32 weights + an 8-byte count). "
        "coord s = plain/ckks coordinator time (checks, artifacts, sum). "
        "1-host ratio: every site's work on one machine, one after another. rel err: max |decrypted - exact "
        "average| / max |weight| (CKKS); the parameters' bound is relative to full scale."
    )
    results["rounds"] = [
        {
            "sites": row.sites,
            "num_parameters": row.num_parameters,
            "round_ratio": row.ratio,
            "uplink_ratio": row.bytes_per_parameter_over_4,
            "plain_uplink_ratio": row.plain.upload_bytes / row.num_parameters / 4,
            "plain": asdict(row.plain) | {"round_s": row.plain.round_s},
            "ckks": asdict(row.ckks) | {"round_s": row.ckks.round_s},
            "parameters": row.parameters.to_dict(),
        }
        for row in rows
    ]
    atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
