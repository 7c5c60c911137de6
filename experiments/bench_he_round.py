"""Benchmark: what CKKS costs a whole federated round, and the chains' share of it, measured side by side.

    python -m medtwin.experiments.bench_he_round [--task mlp|vitals] [--sites 4 8] [--hidden 512 128]
                                                 [--features 64] [--local-steps 100] [--batch-size 32]
                                                 [--rounds 3] [--chain none|anvil] [--tasks ...]
                                                 [--wire-only] [--out .medtwin/bench/he_round.json]

First, in the same run, the bytes on the wire (`bench_he_wire`): uplink and downlink per parameter
÷ float32 for every shipped task's model and this MLP (with the first `--sites`). Then the rounds.
Both are printed and written to `--out` as JSON.

The workload: `--task mlp` (default) is a ~100k-parameter MLP on synthetic data (`--features`,
`--hidden`; each site `--local-steps` SGD steps of `--batch-size` at 0.01 over as many rows);
`--task vitals` is the vital-signs twin with its shipped recipe (configs/task/vitals.yaml, strategy
fedavg_vitals: 100 Adam steps of 64 windows per site) on its generated wards (its own site count;
`--sites`, `--local-steps` and `--batch-size` do not apply).

A round is built from the pieces the real round loop runs (server/loop.py, client/app.py), in order:

    site         [chain: its approval of the run] -> take the previous round's certified updates
                 (verify the certificate, sum them itself, decrypt under CKKS) -> local training
                 (`train_locally`) -> pack (encrypt + sign, with its dataset manifest)
    coordinator  [chain: the round's sites' admissions, in one batch]; for each update: verify the
                 signed claim, check its payload / ciphertext shape; store every update, sum (CKKS: public context only),
                 store the aggregate and certify it; [chain: decisions + dataset commitments + anchor,
                 made durable and handed to each chain's background sender]
    site         [chain: its approval] -> take the certified updates again (verify, sum, decrypt)
                 -> evaluate on its test split (computed, not released) -> [chain: the aggregate's anchor, waiting for it to land]

The [chain] steps run with `--chain anvil` only: the real calls against two local anvil nodes
(started in a temporary folder, stopped by PID), the coordinator's session and, for the sites,
read-only sessions as in a simulation (bench_round_chain.py). "chain" is what the round's parties wait
for on the critical path; the background senders' time (sending, gas estimates, receipts) is reported
apart as "background send", and senders are drained between rounds, outside the timings.

Sites work in parallel in a real federation, so the round time is the critical path: per step the
slowest site, plus the coordinator's serial work. Sites are timed one after another here (2 shared
cores). Network transfer is not timed; the bytes column says how much one site uploads.
"plain" is crypto=plain (float32 updates, float64 sums; signed and verified like every update);
"ckks" uses the project's crypto=ckks defaults (configs/crypto/ckks.yaml, max_total_examples = 2 x the
sites' rows as in simulation). Both federations share the sites' identities, data and chains, and their
rounds are interleaved (plain, ckks, then ckks, plain, ...) so machine load hits both alike. Times are
medians over `--rounds` timed rounds after one warm-up round each.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord

from medtwin.client.aggregate_check import decode_certified, verify_certificate
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
from medtwin.core.protocol import RoundCertificate, payload_sha256, site_reply_record
from medtwin.core.rundir import atomic_write_text
from medtwin.experiments.bench_he_wire import add_wire_arguments, print_wire_table, wire_rows
from medtwin.experiments.bench_round_chain import Chains, RunChain, anvil_chains
from medtwin.experiments.bench_round_workloads import Workload, mlp_workload, task_workload
from medtwin.server.aggregation import Aggregator, CkksAggregator, PlainAggregator, SiteUpdate
from medtwin.server.verifier import ReplyVerifier
from medtwin.server.loop import sum_and_certify

SCHEMES = ("plain", "ckks")
CRYPTO_STEPS = ("decode_s", "pack_s", "coordinator_s", "evaluate_decode_s")  # the steps the scheme changes
T = TypeVar("T")


@dataclass(frozen=True)
class RoundTiming:
    decode_s: float  # slowest site: verify, sum and decode the previous round's certified updates (train phase)
    train_s: float  # slowest site: local training
    pack_s: float  # slowest site: pack (CKKS: encrypt, sign, keep its plaintext update)
    coordinator_s: float  # verify + check + store every update, sum, store and certify the aggregate
    evaluate_decode_s: float  # slowest site: verify, sum and decode the new aggregate (evaluation phase)
    evaluate_s: float  # slowest site: the model's metrics on its test split
    one_machine_s: float  # everything one after another (one host simulating every site)
    upload_bytes: int  # one site's update payload
    relative_error: float = 0.0  # max |decoded average - exact average| / max |exact average|
    site_chain_s: float = 0.0  # slowest site: its approval check before training
    # admissions of every update + closing the round: its writes (decisions, anchor) made durable and handed to
    # the background senders (before d1b8902's successor: sent and mined synchronously)
    coordinator_chain_s: float = 0.0
    evaluate_chain_s: float = 0.0  # slowest site: its approval and its wait for the aggregate's anchor before evaluating
    # parts and companions of the above (not added to round_s again):
    close_chain_s: float = 0.0  # the part of coordinator_chain_s spent closing the round on chain
    anchor_wait_s: float = 0.0  # slowest site: the part of evaluate_chain_s spent reading / waiting for the anchor
    background_send_s: float = 0.0  # the senders' time putting the round's writes on chain (off the critical path)

    @property
    def chain_s(self) -> float:
        return self.site_chain_s + self.coordinator_chain_s + self.evaluate_chain_s

    @property
    def round_s(self) -> float:
        return (
            self.decode_s + self.train_s + self.pack_s + self.coordinator_s + self.evaluate_decode_s + self.evaluate_s
            + self.chain_s
        )  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self) | {
            "round_s": self.round_s, "chain_s": self.chain_s, "chain_share": self.chain_s / self.round_s,
            "background_send_over_round": self.background_send_s / self.round_s,
        }  # fmt: skip


@dataclass(frozen=True)
class Row:
    workload: str
    sites: int
    num_parameters: int
    plain: RoundTiming
    ckks: RoundTiming
    parameters: CkksParameters

    @property
    def ratio(self) -> float:
        return self.ckks.round_s / self.plain.round_s

    @property
    def crypto_overhead_s(self) -> float:
        """What CKKS adds to the steps it changes (decode, pack, coordinator, evaluation decode), training aside."""
        return sum(getattr(self.ckks, name) - getattr(self.plain, name) for name in CRYPTO_STEPS)

    @property
    def bytes_per_parameter_over_4(self) -> float:
        return self.ckks.upload_bytes / self.num_parameters / 4


def _timed(action: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    result = action()
    return time.perf_counter() - start, result


@dataclass
class Federation:
    """Every site makes its own identity, the admin provisions from public files; CKKS keys from site 0."""

    site_ids: list[str]
    kits: list[SiteKit]
    kit_dirs: dict[str, Path]
    state_dirs: dict[str, Path]
    codecs: dict[str, list]  # scheme -> one codec per site
    aggregators: dict[str, Callable[[], Aggregator]]
    parameters: CkksParameters

    @classmethod
    def create(cls, root: Path, *, sites: int, num_parameters: int, max_total_examples: int) -> Federation:
        site_ids = [f"site{index}-of-{sites}" for index in range(sites)]  # one anvil pair serves every size
        kit_dirs = {site_id: root / site_id / "kit" for site_id in site_ids}
        public_files = [init_site_identity(kit_dirs[site_id], site_id=site_id) for site_id in site_ids]
        admin = provision_federation(root / "admin", federation_name="bench", site_public_files=public_files)
        kits = [join_federation(kit_dirs[site_id], admin.manifest_path) for site_id in site_ids]
        crypto = replace(compose_config(["crypto=ckks"]).crypto, max_total_examples=max_total_examples)
        parameters = ckks_parameters_from_config(crypto, num_parameters=num_parameters, num_sites=sites)
        distribution = steward_generate_he_keys(kit_dirs[site_ids[0]], parameters, outbox_dir=root / "outbox")
        for site_id, envelope in distribution.envelope_paths.items():
            install_he_secret(kit_dirs[site_id], envelope)

        def ckks_aggregator() -> Aggregator:
            return CkksAggregator.from_files(public_context_path=str(distribution.public_context_path))

        return cls(
            site_ids=site_ids, kits=kits, kit_dirs=kit_dirs,
            state_dirs={site_id: root / site_id / "state" for site_id in site_ids},
            codecs={
                "plain": [PlainSiteCodec() for _ in site_ids],
                "ckks": [CkksSiteCodec.from_kit(kit_dirs[site_id], distribution.key_id) for site_id in site_ids],
            },
            aggregators={"plain": PlainAggregator, "ckks": ckks_aggregator},
            parameters=parameters,
        )  # fmt: skip


def _dataset_manifest(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256(b"medtwin-bench/dataset\x00")
    for array in (x, y):
        digest.update(hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class Certified:
    """What the coordinator sends with an aggregate: its certificate and the certified updates."""

    server_round: int
    aggregate: ArrayRecord
    certificate: RoundCertificate
    updates: list[ArrayRecord]


class SchemeRounds:
    """One scheme's federated run, a round at a time, with its own run id, aggregator and artifacts."""

    def __init__(self, scheme: str, workload: Workload, federation: Federation, *, workdir: Path, chains: Chains | None):
        self.scheme, self.workload, self.federation = scheme, workload, federation
        self.run_id = f"bench-he-round-{scheme}-{workload.sites}"
        self.codecs = federation.codecs[scheme]
        self.aggregator = federation.aggregators[scheme]()
        self.verifier = ReplyVerifier(federation.kits[0].manifest, run_id=self.run_id)
        self.artifacts = ArtifactStore(workdir / scheme / "artifacts")
        torch.manual_seed(0)
        self.initial = model_to_vector(workload.build_model())
        self.manifests = {site_id: _dataset_manifest(*workload.train[index]) for index, site_id in enumerate(federation.site_ids)}
        self.previous: Certified | None = None
        self.chain = (
            RunChain(
                chains, run_id=self.run_id, task=workload.name, manifest=federation.kits[0].manifest,
                site_kits=federation.kit_dirs, site_state_dirs={s: d / scheme for s, d in federation.state_dirs.items()},
                artifacts_root=self.artifacts.root,
                he_parameters=federation.parameters.to_dict() if scheme == "ckks" else {},
            )
            if chains is not None else None
        )  # fmt: skip

    def _site_average(self, index: int, certified: Certified) -> np.ndarray:
        """What a site does with an aggregate (client/app.py `current_model`): verify, sum the certified updates itself, decode."""
        kit, codec = self.federation.kits[index], self.codecs[index]
        verified = verify_certificate(
            certified.certificate.to_record(), certified.aggregate, certified.updates, manifest=kit.manifest,
            run_id=self.run_id, server_round=certified.server_round, min_participants=self.workload.sites,
        )  # fmt: skip
        average, _ = decode_certified(codec, verified, unusable="benchmark updates do not decode")
        return average

    def _signed_update(self, index: int, weights: np.ndarray, *, num_examples: int, server_round: int):
        """What a site sends: the packed payload and its signed claim (both schemes are signed)."""
        kit = self.federation.kits[index]
        record = self.codecs[index].pack(weights, num_examples=num_examples, run_id=self.run_id)
        claim = ReplyClaim(
            kind="update", run_id=self.run_id, server_round=server_round, site_id=kit.site_id,
            payload_sha256=payload_sha256(record), num_examples=int(num_examples),
            dataset_manifest=self.manifests[kit.site_id], status="trained",
        )  # fmt: skip
        return record, site_reply_record(claim, sign_claim(kit.signing_key, claim))

    def _coordinate(self, server_round: int, replies: list) -> tuple[Certified, float, float]:
        """The coordinator's round: (the certified aggregate, seconds of it spent on chain calls, of which closing the round)."""
        chain_s = close_s = 0.0
        accepted = []
        if self.chain is not None:  # the round's admissions, read together before the updates (RoundLoop.round_admissions)
            chain_s += self.chain.admissions_s(self.federation.site_ids)
        for node_id, record, site_record in replies:
            verified = self.verifier.verify(
                site_record, node_id=node_id, kind="update", server_round=server_round, payload_sha256=payload_sha256(record)
            )
            update = SiteUpdate(node_id=node_id, record=record, claim=verified.claim, signature=verified.signature)
            problem = self.aggregator.check(update)
            if problem:
                raise RuntimeError(f"benchmark update rejected: {problem}")
            self.verifier.accept(verified)
            self.aggregator.accept(update)
            accepted.append(update)
        digests, aggregate, certificate = sum_and_certify(self.artifacts, self.aggregator, server_round, accepted)  # the round loop's
        if self.chain is not None:
            close_s = self.chain.close_round_s(
                server_round=server_round, update_digests=digests, aggregate_digest=certificate.aggregate_sha256,
                dataset_manifests={update.site_id: update.claim.dataset_manifest for update in accepted},
                he_error_bound=self.aggregator.sum_error_bound(len(accepted)),
            )  # fmt: skip
        return Certified(server_round, aggregate, certificate, [update.record for update in accepted]), chain_s + close_s, close_s

    def run_round(self, server_round: int) -> RoundTiming:
        workload, site_ids = self.workload, self.federation.site_ids
        site_chain, decode, train, pack, replies, weighted = [], [], [], [], [], []
        for index, site_id in enumerate(site_ids):
            site_chain.append(self.chain.site_train_checks_s(site_id) if self.chain is not None else 0.0)
            model = workload.build_model()
            if self.previous is None:
                decode.append(0.0)
                vector_to_model(model, self.initial)
            else:
                seconds, average = _timed(lambda: self._site_average(index, self.previous))
                decode.append(seconds)
                vector_to_model(model, average)
            x, y = workload.train[index]
            seconds, result = _timed(
                lambda: train_locally(
                    model, x, y, loss_fn=workload.loss_fn(), local_steps=workload.local_steps, batch_size=workload.batch_size,
                    optimizer_name=workload.optimizer, learning_rate=workload.learning_rate, seed=server_round * 1000 + index,
                )
            )  # fmt: skip
            train.append(seconds)
            weights = model_to_vector(model)
            seconds, (record, site_record) = _timed(
                lambda: self._signed_update(index, weights, num_examples=result.num_examples, server_round=server_round)
            )
            pack.append(seconds)
            weighted.append((weights.astype(np.float64) * result.num_examples, result.num_examples))
            replies.append((index + 1, record, site_record))

        sent_before = self.chain.background_send_s() if self.chain is not None else 0.0
        started = time.perf_counter()
        certified, coordinator_chain_s, close_chain_s = self._coordinate(server_round, replies)
        coordinator_s = time.perf_counter() - started - coordinator_chain_s
        self.previous = certified

        exact = sum(vector for vector, _ in weighted) / sum(count for _, count in weighted)
        evaluate_chain, anchor_wait, evaluate_decode, evaluate, errors = [], [], [], [], []
        for index, site_id in enumerate(site_ids):  # in client/app.py's order: approval, decode, evaluate, anchor
            approval_s = self.chain.site_evaluate_checks_s(site_id) if self.chain is not None else 0.0
            seconds, average = _timed(lambda: self._site_average(index, certified))
            evaluate_decode.append(seconds)
            errors.append(float(np.max(np.abs(average - exact)) / np.max(np.abs(exact))))
            model = workload.build_model()
            vector_to_model(model, average)
            seconds, _ = _timed(lambda: workload.evaluate(model, *workload.test[index]))
            evaluate.append(seconds)
            anchor_wait.append(
                self.chain.anchor_wait_s(site_id, server_round=server_round, aggregate_sha256=certified.certificate.aggregate_sha256)
                if self.chain is not None else 0.0
            )  # fmt: skip
            evaluate_chain.append(approval_s + anchor_wait[-1])
        background_send_s = 0.0
        if self.chain is not None:  # between rounds, untimed: the senders finish this round's writes
            self.chain.drain()
            background_send_s = self.chain.background_send_s() - sent_before
        every = (site_chain, decode, train, pack, evaluate_chain, evaluate_decode, evaluate)
        return RoundTiming(
            decode_s=max(decode),
            train_s=max(train),
            pack_s=max(pack),
            coordinator_s=coordinator_s,
            evaluate_decode_s=max(evaluate_decode),
            evaluate_s=max(evaluate),
            one_machine_s=sum(sum(times) for times in every) + coordinator_s + coordinator_chain_s,
            upload_bytes=sum(len(array.data) for array in replies[0][1].values()),
            relative_error=max(errors),
            site_chain_s=max(site_chain),
            coordinator_chain_s=coordinator_chain_s,
            evaluate_chain_s=max(evaluate_chain),
            close_chain_s=close_chain_s,
            anchor_wait_s=max(anchor_wait),
            background_send_s=background_send_s,
        )


def _median_timing(timings: list[RoundTiming]) -> RoundTiming:
    fields = [name for name in RoundTiming.__dataclass_fields__ if name.endswith("_s")]
    medians = {name: statistics.median(getattr(timing, name) for timing in timings) for name in fields}
    return RoundTiming(
        **medians, upload_bytes=timings[-1].upload_bytes, relative_error=max(timing.relative_error for timing in timings)
    )


def bench(workload: Workload, *, rounds: int, chains: Chains | None, workdir: Path) -> Row:
    """Both schemes over the same sites, data and chains; a warm-up round each, then `rounds` interleaved rounds."""
    torch.manual_seed(0)
    num_parameters = int(model_to_vector(workload.build_model()).size)
    federation = Federation.create(
        workdir / "federation", sites=workload.sites, num_parameters=num_parameters, max_total_examples=workload.max_total_examples
    )
    runs = {scheme: SchemeRounds(scheme, workload, federation, workdir=workdir, chains=chains) for scheme in SCHEMES}
    timings: dict[str, list[RoundTiming]] = {scheme: [] for scheme in SCHEMES}
    for server_round in range(1, rounds + 2):
        order = SCHEMES if server_round % 2 else SCHEMES[::-1]
        for scheme in order:
            timing = runs[scheme].run_round(server_round)
            if server_round > 1:  # round 1 has no aggregate to decode and warms caches up
                timings[scheme].append(timing)
    return Row(
        workload=workload.name, sites=workload.sites, num_parameters=num_parameters,
        plain=_median_timing(timings["plain"]), ckks=_median_timing(timings["ckks"]), parameters=federation.parameters,
    )  # fmt: skip


def print_rounds(rows: list[Row], *, rounds: int, chain: str) -> None:
    print(f"One federated round, {rows[0].workload}; medians of {rounds} interleaved rounds; chain={chain}")
    header = (
        f"{'sites':>5} {'params':>7} {'plain round s':>13} {'enc round s':>11} {'ratio':>6} {'bytes/param/4':>13} "
        f"{'train s':>7} {'enc+sign s':>10} {'coord s':>14} {'decode s':>14} {'chain s':>7} {'chain share':>13} "
        f"{'bg send s':>9} {'1-host ratio':>12} {'rel err':>7}  CKKS parameters"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        p, plain, ckks = row.parameters, row.plain, row.ckks
        print(
            f"{row.sites:>5} {row.num_parameters:>7} {plain.round_s:>13.3f} {ckks.round_s:>11.3f} {row.ratio:>6.2f} "
            f"{row.bytes_per_parameter_over_4:>13.2f} {ckks.train_s:>7.3f} {ckks.pack_s:>10.3f} "
            f"{plain.coordinator_s:>6.3f}/{ckks.coordinator_s:<7.3f} {plain.decode_s:>6.3f}/{ckks.decode_s:<7.3f} "
            f"{ckks.chain_s:>7.3f} {plain.chain_s / plain.round_s:>6.1%}/{ckks.chain_s / ckks.round_s:<6.1%} "
            f"{ckks.background_send_s:>9.3f} {ckks.one_machine_s / plain.one_machine_s:>12.2f} {ckks.relative_error:>7.1e}  "
            f"N={p.poly_modulus_degree} {list(p.coeff_mod_bit_sizes)} 2^{p.scale_bits}, {p.num_ciphertexts} ciphertexts, "
            f"full-scale bound {p.predicted_error_bound:.1e} (|w| <= {p.max_abs_weight_bound:g}, sum n <= {p.max_total_examples})"
        )
    for row in rows:
        if row.ckks.chain_s:
            print(
                f"{row.sites} sites, chain s of the ckks round: sites' approval checks {row.ckks.site_chain_s:.3f}, coordinator "
                f"{row.ckks.coordinator_chain_s:.3f} (of which closing the round {row.ckks.close_chain_s:.3f}), before "
                f"evaluating {row.ckks.evaluate_chain_s:.3f} (of which the anchor {row.ckks.anchor_wait_s:.3f}); "
                f"background send {row.ckks.background_send_s:.3f} s"
            )
        print(
            f"{row.sites} sites: CKKS adds {row.crypto_overhead_s:.3f} s to decode + pack + coordinator + evaluation decode "
            f"= {row.crypto_overhead_s / row.plain.round_s:.1%} of the plain round (training time aside)"
        )
    plain_ratio = rows[0].plain.upload_bytes / rows[0].num_parameters / 4
    print(
        f"plain bytes/param/4 = {plain_ratio:.2f} (float32 weights + an 8-byte count). "
        "coord s and decode s = plain/ckks (coordinator: checks, artifacts, sum, certificate; decode: a site's "
        "certificate check, own sum and decryption of the certified updates). chain s = what the ckks round's parties "
        "wait for on chain, on the critical path (slowest site's approval check before training, coordinator's "
        "admissions and its durable hand-off of the round's writes, slowest site's approval + wait for the anchor "
        "before evaluating); chain share = chain s / round s, plain/ckks. bg send s = the ckks round's background "
        "senders putting its writes on chain (not on the critical path, not in round s). "
        "1-host ratio: every site's work on one machine, one after another. rel err: max |decrypted - exact "
        "average| / max |weight| (CKKS); the parameters' bound is relative to full scale."
    )


def row_to_dict(row: Row) -> dict:
    return {
        "workload": row.workload,
        "sites": row.sites,
        "num_parameters": row.num_parameters,
        "round_ratio": row.ratio,
        "crypto_overhead_s": row.crypto_overhead_s,
        "crypto_overhead_over_plain_round": row.crypto_overhead_s / row.plain.round_s,
        "chain_share_plain": row.plain.chain_s / row.plain.round_s,
        "chain_share_ckks": row.ckks.chain_s / row.ckks.round_s,
        "uplink_ratio": row.bytes_per_parameter_over_4,
        "plain_uplink_ratio": row.plain.upload_bytes / row.num_parameters / 4,
        "plain": row.plain.to_dict(),
        "ckks": row.ckks.to_dict(),
        "parameters": row.parameters.to_dict(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("mlp", "vitals"), default="mlp", help="the workload (see above)")
    parser.add_argument("--sites", type=int, nargs="+", default=[4, 8], help="mlp only: one row per federation size")
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 128])
    parser.add_argument("--local-steps", type=int, default=100, help="mlp only")
    parser.add_argument("--batch-size", type=int, default=32, help="mlp only")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chain", choices=("none", "anvil"), default="none", help="anvil: time the round's real chain calls too")
    add_wire_arguments(parser)
    parser.add_argument("--wire-only", action="store_true", help="measure bytes on the wire only, no timed rounds")
    parser.add_argument("--out", type=Path, default=Path(".medtwin/bench/he_round.json"))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds is {args.rounds}; time at least one round after the warm-up (e.g. --rounds 3)")
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
    load_before = os.getloadavg()
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medtwin-bench-he-")))
        chains = stack.enter_context(anvil_chains(scratch)) if args.chain == "anvil" else None
        if args.task == "vitals":
            workloads = [task_workload("vitals")]
        else:
            workloads = [
                mlp_workload(sites=sites, features=args.features, hidden=tuple(args.hidden), local_steps=args.local_steps, batch_size=args.batch_size)
                for sites in args.sites
            ]  # fmt: skip
        rows = [
            bench(workload, rounds=args.rounds, chains=chains, workdir=scratch / f"sites-{workload.sites}") for workload in workloads
        ]
    load_after = os.getloadavg()
    print_rounds(rows, rounds=args.rounds, chain=args.chain)
    print(f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")  # fmt: skip
    results["rounds"] = [row_to_dict(row) for row in rows]
    results["settings"] = {
        "task": args.task, "chain": args.chain, "rounds": args.rounds, "interleaved": True,
        "load_average_before": list(load_before), "load_average_after": list(load_after),
    }  # fmt: skip
    atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
