"""Benchmark: chain cost per federated round, and the time an auditor needs to verify a run.

    python -m medtwin.experiments.bench_chain [--backend anvil|embedded] [--sites 4 16 64]
                                              [--rounds 5] [--verify-rounds 100] [--verify-sites 10]
                                              [--update-bytes 65536]

Per federation size k it registers k sites (each approves the run), then runs `--rounds` rounds of
the coordinator's chain work: one `record_decisions` batch on the auth chain (k admit decisions),
`commit_datasets` (round 1 only) and one `anchor_round` on the data chain. It reports transactions
and gas per round on each chain and the wall time of those writes (median over rounds). Then it
anchors `--verify-rounds` rounds of `--verify-sites` sites with `--update-bytes` random updates
and times `audit_verify` from a read-only session (as an auditor would). Synthetic bytes only.
The anvil backend starts two local nodes in a temporary directory and stops them (by PID).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from medtwin.chain import (
    ChainSession,
    Decision,
    RunRegistration,
    audit_verify,
    build_round_anchor,
    chain_down,
    chain_up,
    open_readonly,
    open_session,
)
from medtwin.chain.backends import free_port
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config.chain import ChainConfig


@dataclass(frozen=True)
class RoundCost:
    sites: int
    auth_txs: float
    auth_gas: float
    data_txs_first: int
    data_txs_later: float
    data_gas_first: int
    data_gas_later: float
    chain_ms: float  # median wall time of one round's chain writes


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _register(session: ChainSession, run_id: str, sites: list[str]) -> None:
    for site_id in sites:
        account = session.site_account(site_id)
        if session.auth.site(site_id) is None:
            session.auth.register_site(site_id=site_id, address=account.address, key_fingerprint=_digest(f"key {site_id}"))
        session.auth.approve_run(site=account, run_id=run_id, config_hash=_digest("config"), code_hash=_digest("code"))
    session.data.register_run(RunRegistration(run_id, "bench", _digest("config"), _digest("code"), _digest("dp"), _digest("he")))


def _round(session: ChainSession, store: ArtifactStore, run_id: str, round_index: int, sites: list[str], update_bytes: int):
    """One round of coordinator chain work; returns (auth receipts, data receipts, seconds)."""
    digests = {site: store.put(os.urandom(update_bytes), kind="update") for site in sites}
    aggregate = store.put(os.urandom(update_bytes), kind="aggregate")
    started = time.perf_counter()
    auth = [session.auth.record_decisions(
        [Decision("admit_update", True, "ok", site_id=site, subject=digest) for site, digest in digests.items()],
        run_id=run_id, round_index=round_index,
    )]  # fmt: skip
    data = []
    if round_index == 1:
        committed = session.data.commit_datasets(run_id=run_id, manifests={site: _digest(f"data {site}") for site in sites})
        data += [committed] if committed else []
    anchor, _ = build_round_anchor(
        store, run_id=run_id, round_index=round_index, update_digests=digests, aggregate_digest=aggregate,
        epsilon_by_site={site: 0.1 * round_index for site in sites}, he_error_bound=2e-8,
    )  # fmt: skip
    data.append(session.data.anchor_round(anchor))
    return auth, data, time.perf_counter() - started


def bench_round_cost(session: ChainSession, store: ArtifactStore, sites: int, rounds: int) -> RoundCost:
    run_id = f"bench-{sites}-{time.time_ns()}"
    names = [f"site{index:03d}" for index in range(sites)]
    _register(session, run_id, names)
    results = [_round(session, store, run_id, index, names, 1024) for index in range(1, rounds + 1)]
    assert all(receipt.mined for auth, data, _ in results for receipt in auth + data)
    later = results[1:] or results
    return RoundCost(
        sites=sites,
        auth_txs=statistics.mean(len(auth) for auth, _, _ in results),
        auth_gas=statistics.mean(sum(r.gas_used for r in auth) for auth, _, _ in results),
        data_txs_first=len(results[0][1]),
        data_txs_later=statistics.mean(len(data) for _, data, _ in later),
        data_gas_first=sum(r.gas_used for r in results[0][1]),
        data_gas_later=statistics.mean(sum(r.gas_used for r in data) for _, data, _ in later),
        chain_ms=1000 * statistics.median(seconds for _, _, seconds in results),
    )


def bench_verify(session: ChainSession, store: ArtifactStore, state_dir: Path | None, rounds: int, sites: int, update_bytes: int):
    run_id = f"bench-verify-{time.time_ns()}"
    names = [f"vsite{index:03d}" for index in range(sites)]
    _register(session, run_id, names)
    started = time.perf_counter()
    for index in range(1, rounds + 1):
        _round(session, store, run_id, index, names, update_bytes)
    write_s = time.perf_counter() - started
    auditor = open_readonly(state_dir) if state_dir is not None else session
    report = audit_verify(auditor, ArtifactStore(store.root), run_id)
    assert report.ok, report.mismatches
    return write_s, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("anvil", "embedded"), default="anvil")
    parser.add_argument("--sites", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--verify-rounds", type=int, default=100)
    parser.add_argument("--verify-sites", type=int, default=10)
    parser.add_argument("--update-bytes", type=int, default=65536)
    args = parser.parse_args(argv)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="medtwin-bench-chain-") as scratch:
        state_dir = Path(scratch) / "chain"
        if args.backend == "anvil":
            config = ChainConfig(name="anvil", auth_port=free_port(), data_port=free_port())
            chain_up(config, state_dir)
        else:
            config = ChainConfig(name="embedded")
        try:
            session = open_session(config, state_dir=state_dir)
            store = ArtifactStore(Path(scratch) / "artifacts")
            costs = [bench_round_cost(session, store, sites, args.rounds) for sites in args.sites]
            write_s, report = bench_verify(
                session, store, state_dir if args.backend == "anvil" else None, args.verify_rounds, args.verify_sites, args.update_bytes
            )
        finally:
            if args.backend == "anvil":
                chain_down(state_dir)
    table = Table(title=f"chain cost per round ({args.backend}, {args.rounds} rounds, median time)")
    for column in ("sites", "auth tx", "auth gas", "data tx r1", "data tx r>1", "data gas r1", "data gas r>1", "chain ms/round"):
        table.add_column(column, justify="right")
    for cost in costs:
        table.add_row(
            str(cost.sites), f"{cost.auth_txs:g}", f"{cost.auth_gas:,.0f}", str(cost.data_txs_first), f"{cost.data_txs_later:g}",
            f"{cost.data_gas_first:,}", f"{cost.data_gas_later:,.0f}", f"{cost.chain_ms:.0f}",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"audit verify: {report.rounds_checked} rounds x {args.verify_sites} sites, {report.artifacts_checked} artifacts "
        f"({args.update_bytes} B updates) in {report.elapsed_s:.2f} s; writing those rounds took {write_s:.1f} s"
    )


if __name__ == "__main__":
    main()
