"""Flower's own deployed round trip on this machine (the floor), beside medtwin's deployment and simulation rounds.

    python -m medtwin.experiments.bench_flower_floor [--floor-rounds 8] [--with-medtwin [--rounds 4]]
                                                     [--out .medtwin/bench/flower_floor.json]

The floor: the deploy demo's kind of parties — a TLS `flower-superlink` with SuperNode authentication and a
persistent database, four SuperNodes with TLS, their own auth keys and medtwin's Flower tuning (`prompt_flower`:
shorter idle and reply polls, prompt object-pull retries), each with one warm ClientApp worker — all separate
processes on 127.0.0.1, running the no-op app of `flower_floor.py`: per round a train and an evaluate phase,
each node's message with the Flower objects and bytes of medtwin's Fed-Heart-Disease DP+CKKS messages, each
reply sent at once. A round is its two phases' wall time at the ServerApp (first message built → last reply);
round 1 carries start-up, so the figure is the median of rounds 2..N. Where a phase goes (median over those
phases; seconds from the phase's start, the latest of the sites): the ServerApp's push returned, the worker got
the task, had pulled the message, had pushed its reply, the ServerApp had the reply. CPU seconds by party
(from /proc): a round (≈ rounds 2..N) and, before the run, a second with every SuperNode connected and idle.

`--with-medtwin` runs `bench_deployment`'s measurement (deploy demo, then simulation, `--rounds`) in the same
command, so the JSON holds floor, deployment and simulation rounds of one run; without it the ratios quote the
latest `.medtwin/bench/deployment.json`, named as such. Every process is stopped by PID, also on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from medtwin.core.identity import init_site_identity, join_federation, provision_federation
from medtwin.core.rundir import atomic_write_text

from .deploy_demo import SITES, site_file
from .deployment import COORDINATOR_CONNECTION, CoordinatorProcess, DeploymentError, SiteProcess, run_status, submit_run, wait_for_run
from .flower_local import APP_DIR

logger = logging.getLogger("medtwin.bench_flower_floor")

TASKS_LOG = "floor-tasks.jsonl"
IDLE_SAMPLE_S = 5.0  # before the run: CPU of the parties with every SuperNode connected and idle
STATUS_CHECK_S = 120.0  # waiting for the timings, ask (one Control API request) whether the run ended without them
FLOOR_PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "medtwin-flower-floor"
version = "1.0.0"
description = "A no-op Flower app with medtwin's message shapes (medtwin/experiments/flower_floor.py)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "medtwin"

[tool.flwr.app.components]
serverapp = "medtwin.experiments.flower_floor:server_app"
clientapp = "medtwin.experiments.flower_floor:client_app"

[tool.flwr.app.config]
floor-rounds = 8
floor-sites = 4
floor-timings = ""
"""


class FloorSiteProcess(SiteProcess):
    """A SuperNode started as a site's is (same flags, kit, tuning), wrapped by `flower_floor` instead of
    `warm_clientapp`: its warm worker serves the no-op app and logs each task's stamps to `tasks_log`."""

    @property
    def tasks_log(self) -> Path:
        return self._state_dir() / TASKS_LOG

    def executor_command(self) -> list[str]:
        return [
            sys.executable, "-m", "medtwin.experiments.flower_floor", "--tasks-log", str(self.tasks_log),
            "--runtime-api-address", f"127.0.0.1:{self.port}",
        ]  # fmt: skip


def write_floor_app(directory: Path) -> Path:
    """The FAB's folder `flwr run` builds from: a pyproject.toml naming flower_floor's apps (installed code)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(FLOOR_PYPROJECT, encoding="utf-8")
    return directory


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def later(values: list[float]) -> list[float]:
    """Rounds 2..N (round 1 carries start-up), or all of them for a one-round run."""
    return values[1:] if len(values) > 1 else values


def read_tasks(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summarize_floor(timings: dict, tasks_by_site: dict[str, list[dict]], *, sites: int) -> dict:
    """Per-round wall time and, per phase, when each milestone was reached by the latest site (s from the
    phase's start); a phase with a missing or error reply raises `DeploymentError`."""
    phases = timings["phases"]
    for phase in phases:
        if phase["errors"] or len(phase["replied"]) < sites:
            raise DeploymentError(
                f"round {phase['round']} {phase['phase']}: {len(phase['replied'])} of {sites} replies, errors {phase['errors']}; "
                "see the SuperNodes' supernode.log under the bench's root"
            )
    rounds: dict[int, float] = {}
    for phase in phases:
        rounds[phase["round"]] = rounds.get(phase["round"], 0.0) + phase["ended"] - phase["started"]
    round_s = [rounds[key] for key in sorted(rounds)]
    milestones: dict[str, list[float]] = {key: [] for key in ("pushed", "task_started", "pulled", "reply_pushed", "task_ended", "replied", "ended")}
    for phase in phases[2:] if len(phases) > 2 else phases:  # rounds 2..N
        start, end = phase["started"], phase["ended"]
        tasks = [task for site_tasks in tasks_by_site.values() for task in site_tasks if start <= task["started"] <= end]
        milestones["pushed"].append(phase["pushed"] - start)
        milestones["replied"].append(max(phase["replied"].values()) - start)
        milestones["ended"].append(end - start)
        for key, stamp in (("task_started", "started"), ("pulled", "pulled"), ("reply_pushed", "pushed"), ("task_ended", "ended")):
            stamps = [task[stamp] for task in tasks if stamp in task]
            if len(stamps) == sites:
                milestones[key].append(max(stamps) - start)
    return {
        "round_s": round_s,
        "round_s_median_later": _median(later(round_s)),
        "phase_milestones_s_median_later": {key: _median(values) for key, values in milestones.items()},
        "worker_task_s_median": _median([task["ended"] - task["started"] for tasks in tasks_by_site.values() for task in tasks]),
    }


def _process_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command line, CPU seconds so far) of every live process."""
    ticks = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is proc(5)'s field 3, state
        table[int(entry.name)] = (int(fields[1]), command, (int(fields[11]) + int(fields[12])) / ticks)
    return table


def cpu_by_role(coordinator_pid: int, site_pids: list[int]) -> dict[int, tuple[str, float]]:
    """Every live process of the floor's parties: pid -> (role, CPU seconds so far). Roles: the SuperLink,
    the ServerApp and the SuperLink's other children (its SuperExec); the SuperNodes (flower-supernode), and
    each site's wrapper with Flower's SuperExec loop, its forkserver and its warm ClientApp worker."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    roles = {}
    for root, side in [(coordinator_pid, "superlink"), *((pid, "site") for pid in site_pids)]:
        pending = [root]
        while pending:
            pid = pending.pop()
            if pid not in table:
                continue
            command = table[pid][1]
            if side == "superlink":
                role = "superlink" if pid == root else "serverapp" if "flwr-serverapp" in command else "superlink_superexec"
            else:
                role = "supernodes" if "prompt_flower" in command else "site_superexec_and_workers"
            roles[pid] = (role, table[pid][2])
            pending += children.get(pid, [])
    return roles


def cpu_seconds_between(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        totals[role] = totals.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    return totals


def _wait_for_timings(
    path: Path, coordinator: CoordinatorProcess, flower_run: int, *, timeout_s: float, on_round_one: Callable[[], None]
) -> dict:
    """The ServerApp's timings once written; `on_round_one()` is called once the workers logged round 1's tasks."""
    started = next_check = time.monotonic()
    tasks_logs = sorted(path.parent.glob(f"*/state/{TASKS_LOG}"))
    round_one_done = False
    while not path.is_file():
        if not round_one_done and sum(len(read_tasks(log)) for log in tasks_logs) >= 2 * len(tasks_logs):
            on_round_one()
            round_one_done = True
        now = time.monotonic()
        if now - started > timeout_s:
            raise DeploymentError(f"the floor's run {flower_run} wrote no {path} within {timeout_s:.0f} s; see {coordinator.log_path}")
        if now >= next_check + STATUS_CHECK_S:
            next_check = now
            status, details = run_status(coordinator.flwr_home, COORDINATOR_CONNECTION, flower_run)
            if status.startswith("finished") and not path.is_file():
                raise DeploymentError(f"the floor's run {flower_run} ended {status} ({details}) without writing {path}; see {coordinator.log_path}")
        time.sleep(0.5)
    return json.loads(path.read_text(encoding="utf-8"))


def start_floor_parties(root: Path, parties: list) -> tuple[CoordinatorProcess, list[FloorSiteProcess]]:
    """As the deploy demo: four sites' identities, the admin's federation, the TLS SuperLink registering their
    SuperNode keys, four SuperNodes (started side by side); each party joins `parties` before it starts."""
    kits = {site: root / site / "kit" for site in SITES}
    public = [init_site_identity(kits[site], site_id=site) for site in SITES]
    admin = provision_federation(root / "admin", federation_name="flower-floor", site_public_files=public)
    for site in SITES:
        join_federation(kits[site], admin.manifest_path)
    coordinator = CoordinatorProcess(admin.root, root / "coordinator")
    parties.append(coordinator)
    coordinator.start()
    nodes = [FloorSiteProcess(site_file(root, site, index), coordinator.address) for index, site in enumerate(SITES)]
    parties += nodes
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(FloorSiteProcess.start, nodes))
    return coordinator, nodes


def run_floor(root: Path, *, rounds: int) -> dict:
    """The parties, a few idle seconds, the no-op run; every process stopped by PID at the end, also on failure."""
    parties: list = []
    started = time.monotonic()
    try:
        coordinator, nodes = start_floor_parties(root, parties)
        setup_s = time.monotonic() - started
        print(f"floor: SuperLink pid {coordinator.pid}, SuperNodes {[node.pid for node in nodes]} up in {setup_s:.0f} s; {rounds} rounds", flush=True)

        def cpu_now() -> dict[int, tuple[str, float]]:
            return cpu_by_role(coordinator.pid, [node.pid for node in nodes])

        idle_before = cpu_now()
        time.sleep(IDLE_SAMPLE_S)  # no run: what the SuperNodes' polls of the SuperLink cost by themselves
        idle_cpu_s = cpu_seconds_between(idle_before, cpu_now())
        timings_path, load_before, later_before = root / "floor-timings.json", os.getloadavg(), {}
        flower_run = submit_run(
            coordinator.flwr_home, COORDINATOR_CONNECTION,
            {"floor-rounds": rounds, "floor-sites": len(nodes), "floor-timings": str(timings_path)}, write_floor_app(root / "app"),
        )  # fmt: skip
        timings = _wait_for_timings(
            timings_path, coordinator, flower_run, timeout_s=120.0 + 60.0 * rounds, on_round_one=lambda: later_before.update(cpu_now())
        )  # fmt: skip
        load_after, cpu_s = os.getloadavg(), cpu_seconds_between(later_before, cpu_now()) if later_before else {}
        outcome = wait_for_run(coordinator.flwr_home, COORDINATOR_CONNECTION, flower_run, timeout_s=60.0, poll_s=1.0)
        summary = summarize_floor(timings, {node.site_id: read_tasks(node.tasks_log) for node in nodes}, sites=len(nodes))
        return {
            "rounds": rounds, "flower_run_status": outcome.status, "setup_s": setup_s, "whole_s": time.monotonic() - started,
            "load_average": {"before": load_before, "after": load_after}, **summary,
            # CPU seconds a round by role, from when the workers had logged round 1's tasks to the timings (≈ rounds 2..N)
            "cpu_s_per_round_later": {role: seconds / max(1, rounds - 1) for role, seconds in sorted(cpu_s.items())},
            "idle_cpu_s_per_s": {role: seconds / IDLE_SAMPLE_S for role, seconds in sorted(idle_cpu_s.items())},
        }  # fmt: skip
    finally:
        for party in reversed(parties):
            party.stop()


def medtwin_rounds(*, with_medtwin: bool, rounds: int, root: Path, latest: Path) -> dict | None:
    """`bench_deployment`'s rounds: measured now (`with_medtwin`), else the latest file's, named as such."""
    if with_medtwin:
        from .bench_deployment import main as bench_deployment

        measured = root / "deployment.json"
        bench_deployment(["--rounds", str(rounds), "--root", str(root / "medtwin"), "--out", str(measured)])
        return {"source": "this run", **json.loads(measured.read_text(encoding="utf-8"))}
    if not latest.is_file():
        return None
    stamp = datetime.fromtimestamp(latest.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {"source": f"{latest} ({stamp}; NOT this run)", **json.loads(latest.read_text(encoding="utf-8"))}


def ratios(floor_s: float, medtwin: dict | None) -> dict:
    if medtwin is None:
        return {}
    deployment_s = statistics.median(later(medtwin["deployment_round_s"]))
    simulation_s = statistics.median(later(medtwin["simulation_round_s"]))
    return {
        "floor_round_s": floor_s, "deployment_round_s": deployment_s, "simulation_round_s": simulation_s,
        "floor_over_simulation": floor_s / simulation_s, "deployment_over_floor": deployment_s / floor_s,
        "deployment_over_simulation": deployment_s / simulation_s,
        "floor_within_1_5x_simulation": floor_s <= 1.5 * simulation_s,
    }  # fmt: skip


def _commit() -> str:
    completed = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=APP_DIR, capture_output=True, text=True, check=False)
    return completed.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--floor-rounds", type=int, default=8)
    parser.add_argument("--with-medtwin", action="store_true", help="also run bench_deployment's measurement (deploy demo + simulation)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of medtwin's deployment and simulation (--with-medtwin)")
    parser.add_argument("--root", type=Path, default=Path(".medtwin/bench-flower-floor"))
    parser.add_argument("--out", type=Path, default=Path(".medtwin/bench/flower_floor.json"))
    parser.add_argument("--latest-deployment", type=Path, default=Path(".medtwin/bench/deployment.json"), help="quoted without --with-medtwin")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    root = (args.root / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")).resolve()
    started = time.monotonic()
    floor = run_floor(root / "floor", rounds=args.floor_rounds)
    medtwin = medtwin_rounds(with_medtwin=args.with_medtwin, rounds=args.rounds, root=root, latest=args.latest_deployment)
    result = {
        "commit": _commit(), "cpus": os.cpu_count(), "floor": floor, "medtwin": medtwin,
        "ratios": ratios(floor["round_s_median_later"], medtwin), "whole_s": time.monotonic() - started,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print_result(result, args.out)


def print_result(result: dict, out: Path) -> None:
    floor = result["floor"]
    print(f"floor rounds (s): {[round(s, 2) for s in floor['round_s']]}  (load average {floor['load_average']['before'][0]:.2f} → {floor['load_average']['after'][0]:.2f})")
    milestones = " · ".join(f"{key} {value:.2f}" for key, value in floor["phase_milestones_s_median_later"].items() if value is not None)
    print(f"a floor phase, s from its start (latest of the sites, median of rounds 2..N): {milestones}")
    cpu = floor["cpu_s_per_round_later"]
    if cpu:
        parts = " · ".join(f"{role} {seconds:.2f}" for role, seconds in cpu.items())
        print(f"CPU s a round (≈ rounds 2..N, {os.cpu_count()} cores): {parts} · all {sum(cpu.values()):.2f}")
        idle = " · ".join(f"{role} {seconds:.2f}" for role, seconds in floor["idle_cpu_s_per_s"].items())
        print(f"CPU s a second with no run (SuperNodes polling): {idle}")
    print(f"Flower's own round trip, {len(SITES)} sites, 2 phases: {floor['round_s_median_later']:.2f} s per round")
    measured = result["ratios"]
    if measured:
        print(
            f"medtwin ({result['medtwin']['source']}): deployment {measured['deployment_round_s']:.2f} s, simulation "
            f"{measured['simulation_round_s']:.2f} s per round\n"
            f"floor ÷ simulation {measured['floor_over_simulation']:.1f}× · deployment ÷ floor {measured['deployment_over_floor']:.1f}× · "
            f"deployment ÷ simulation {measured['deployment_over_simulation']:.1f}× · floor ≤ 1.5× simulation: {measured['floor_within_1_5x_simulation']}"
        )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
