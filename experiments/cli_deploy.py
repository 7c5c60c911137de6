"""`medtwin coordinator start|stop` and `medtwin site start|stop`: real parties on Flower's deployment engine.

    medtwin coordinator start --admin-dir fed --state-dir /srv/medtwin/coordinator [--port 9092]
    medtwin coordinator stop  --state-dir /srv/medtwin/coordinator
    medtwin site start --site-file /srv/medtwin/site.yaml --superlink coordinator.example.org:9092 [--port 9094]
    medtwin site stop  --site-file /srv/medtwin/site.yaml

Both start commands return once the process is up (the SuperLink answers over TLS and every site's
SuperNode key from the manifest is registered; the SuperNode was accepted) and leave it running
with a pidfile in the state folder; the stop commands stop it and every process it started, by PID.
The process logic lives in `medtwin.experiments.deployment`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["coordinator_app", "coordinator_start_command", "coordinator_stop_command", "site_start_command", "site_stop_command"]

console = Console()
coordinator_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The coordinator's Flower SuperLink (TLS, SuperNode auth).")


def _fail(error: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {error}")
    return typer.Exit(code=2)


@coordinator_app.command("start")
def coordinator_start_command(
    admin_dir: Annotated[Path, typer.Option("--admin-dir", help="the folder `medtwin provision --out` wrote (its coordinator/ kit)")],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="the coordinator's state: SuperLink database, pidfile, log, FLWR_HOME")],
    port: Annotated[int, typer.Option("--port", help="the SuperLink's one HTTPS port (Fleet, Control and Runtime APIs in Flower 1.41)")] = 9092,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    startup_timeout_s: Annotated[float, typer.Option("--startup-timeout-s")] = 30.0,
) -> None:
    """Start flower-superlink with the admin's TLS kit and SuperNode auth; register every site's SuperNode key."""
    from .deployment import CoordinatorProcess, DeploymentError

    coordinator = CoordinatorProcess(admin_dir, state_dir, host=host, port=port, startup_timeout_s=startup_timeout_s)
    try:
        coordinator.start()
    except DeploymentError as error:
        raise _fail(error) from None
    console.print(f"SuperLink pid {coordinator.pid} on https://{coordinator.address}  (log {coordinator.log_path})")
    for site_id, node_id in sorted(coordinator.registered.items()):
        console.print(f"  site {site_id}: SuperNode {node_id} registered")
    console.print(
        f"submit runs with FLWR_HOME={coordinator.flwr_home} flwr run . {coordinator.connection}; "
        f"stop with `medtwin coordinator stop --state-dir {coordinator.state_dir}`"
    )


@coordinator_app.command("stop")
def coordinator_stop_command(
    state_dir: Annotated[Path, typer.Option("--state-dir", help="the state folder given to `medtwin coordinator start`")],
) -> None:
    """Stop the SuperLink recorded in --state-dir and every process it started, by PID."""
    from .deployment import DeploymentError, stop_coordinator

    try:
        stopped = stop_coordinator(state_dir)
    except DeploymentError as error:
        raise _fail(error) from None
    console.print(f"stopped {len(stopped)} process(es)" if stopped else f"no SuperLink running for {state_dir}")


def site_start_command(
    site_file: Annotated[Path, typer.Option("--site-file", help="this hospital's site file")],
    superlink: Annotated[str, typer.Option("--superlink", help="the coordinator's SuperLink as host:port")],
    port: Annotated[int, typer.Option("--port", help="this SuperNode's Runtime API port on 127.0.0.1 (one per node on a host)")] = 9094,
    max_wait_time_s: Annotated[float, typer.Option("--max-wait-time-s", help="give up connecting to the SuperLink after this long")] = 30.0,
) -> None:
    """Start this site's flower-supernode (TLS with the kit's CA, the kit's SuperNode key, node_config = the site file)."""
    from .deployment import DeploymentError, SiteProcess

    site = SiteProcess(site_file, superlink, port=port, max_wait_time_s=max_wait_time_s)
    try:
        site.start()
    except DeploymentError as error:
        raise _fail(error) from None
    console.print(
        f"site {site.site_id}: SuperNode {site.node_id} (pid {site.pid}) connected to {superlink}  (log {site.log_path}); "
        f"stop with `medtwin site stop --site-file {site.site_file}`"
    )


def site_stop_command(
    site_file: Annotated[Path, typer.Option("--site-file", help="this hospital's site file")],
) -> None:
    """Stop this site's SuperNode and every process it started, by PID."""
    from .deployment import DeploymentError, stop_site

    try:
        stopped = stop_site(site_file)
    except DeploymentError as error:
        raise _fail(error) from None
    console.print(f"stopped {len(stopped)} process(es)" if stopped else f"no SuperNode running for {site_file}")


def propose_command(
    context: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="where to write the run proposal (YAML) the sites approve")],
) -> None:
    """Compose a run from configs/ and Hydra overrides and write it as the proposal every site approves."""
    from medtwin.core.config import compose_config, config_to_yaml
    from medtwin.core.rundir import atomic_write_text
    from medtwin.server.app import make_run_id

    config = compose_config(list(context.args))
    if not config.run_id:
        config.run_id = make_run_id(config)
    if config.task.csv is not None and config.task.csv.site_files:
        raise typer.BadParameter("a proposal names no site's files: drop task.csv.site_files (each site's path is in its site file)")
    if config.crypto.name == "ckks" and not config.crypto.key_id:
        raise typer.BadParameter("crypto=ckks needs the key steward's key set: add crypto.key_id=<id from `medtwin site keygen`>")
    atomic_write_text(out, config_to_yaml(config))
    console.print(f"run {config.run_id}: proposal written to {out} — each site runs `medtwin site approve {out} --site-file …`")


def check_chains_reachable(chain, *, base: Path) -> None:  # noqa: ANN001 - a ChainConfig
    """Before a run is submitted: both chains it records on answer at the addresses in `chain.state_dir`."""
    from medtwin.chain import chain_status

    from .deployment import DeploymentError

    if chain.name not in ("anvil", "rpc"):
        return
    status = chain_status(base / chain.state_dir)  # a relative state_dir is the coordinator's
    if status.backend == "unknown":
        raise DeploymentError(
            f"chain.state_dir={chain.state_dir} holds no deployment.json: start the chains first "
            f"(`medtwin chain up chain.state_dir={chain.state_dir}`) or fix chain.state_dir in the proposal"
        )
    for node in status.nodes:
        if not node.reachable:
            raise DeploymentError(
                f"the {node.role} chain at {node.rpc_url} (chain.state_dir={chain.state_dir}) does not answer: start it "
                f"with `medtwin chain up chain.state_dir={chain.state_dir}`, or check chain.{node.role}_rpc_url"
            )


def submit_proposal(
    proposal: Path, *, coordinator_state: Path, public_context: Path | None, timeout_s: float, resume: str = ""
) -> Path:
    """`medtwin run --federation`: submit an approved proposal to the coordinator's SuperLink and wait; with
    `resume` (the proposal's run id) the coordinator continues that run after its latest checkpoint."""
    from medtwin.core.config import config_from_yaml
    from medtwin.core.runconfig import CONFIG_YAML_KEY
    from medtwin.server.app import MANIFEST_KEY, PUBLIC_CONTEXT_KEY, REGISTRY_KEY, RESUME_KEY

    from .deployment import COORDINATOR_CONNECTION, COORDINATOR_RECORD, REGISTRY_FILE, DeploymentError, submit_run, wait_for_run

    text = proposal.read_text(encoding="utf-8")
    config = config_from_yaml(text)
    coordinator_state = Path(coordinator_state).resolve()
    if resume and resume != config.run_id:
        raise DeploymentError(
            f"--resume {resume} is not the run {proposal} proposes ({config.run_id!r}): resume a run with the very proposal "
            "its sites approved"
        )
    if not resume:
        from medtwin.server.app import check_new_run

        check_new_run(coordinator_state / config.runs_dir, config.run_id)  # the coordinator's own runs folder
    check_chains_reachable(config.chain, base=coordinator_state)
    flwr_home = coordinator_state / "flwr-home"
    record_path = coordinator_state / COORDINATOR_RECORD
    if not record_path.is_file() or not (flwr_home / "config.toml").is_file():
        raise DeploymentError(f"no coordinator at --federation {coordinator_state}: start it with `medtwin coordinator start`")
    manifest = json.loads(record_path.read_text(encoding="utf-8"))["manifest"]
    run_config = {
        CONFIG_YAML_KEY: text,
        MANIFEST_KEY: manifest,
        PUBLIC_CONTEXT_KEY: str(public_context.resolve()) if public_context else "",
        REGISTRY_KEY: str((coordinator_state / REGISTRY_FILE).resolve()) if (coordinator_state / REGISTRY_FILE).is_file() else "",
        RESUME_KEY: "true" if resume else "",
    }
    flower_run = submit_run(flwr_home, COORDINATOR_CONNECTION, run_config)
    console.print(f"run {config.run_id} submitted as Flower run {flower_run}; waiting (`flwr log {flower_run} {COORDINATOR_CONNECTION}` streams it)")
    outcome = wait_for_run(flwr_home, COORDINATOR_CONNECTION, flower_run, timeout_s=timeout_s)
    if not outcome.completed:
        raise DeploymentError(f"Flower run {flower_run} ended {outcome.status!r} ({outcome.details})")
    return coordinator_state / config.runs_dir / config.run_id  # the ServerApp runs in the coordinator's state folder
