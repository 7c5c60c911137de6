"""The `medtwin` command line: one entry point for researchers, coordinators, sites and auditors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from medtwin.core.config import compose_config
from medtwin.core.errors import MedtwinError
from medtwin.core.pooled_metrics import HISTOGRAM_POOLED_METRICS, HISTOGRAM_POOLED_PREFIX, SITE_LEVEL_METRICS, pooled_name
from medtwin.core.report import CLINICAL_METRICS, ordered_rows
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from .tracking import check_tracking, track

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

DEMO_OVERRIDES = [
    "task=fed_heart_disease",
    "strategy=fedavg_tuned",
    "privacy=dp",
    "privacy.target_epsilon=3.0",
    "crypto=ckks",
    "chain=anvil",
]
EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=verbose)],
        force=True,
    )
    for noisy in ("flwr", "ray", "alembic"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)


def print_summary(run_path: Path) -> None:
    summary = json.loads((run_path / "summary.json").read_text())
    metric = summary["primary_metric"]
    sites = summary["final_metrics"]["sites"]
    shown = [metric] + [name for name in CLINICAL_METRICS if name != metric and any(name in values for values in sites.values())]
    table = Table(title=f"federated model per site (ranked by {metric})")
    table.add_column("site")
    for name in shown:
        table.add_column(name, justify="right")
    for site, values in sites.items():
        table.add_row(site, *(_cell(values.get(name)) for name in shown))
    pooled = summary["final_metrics"]["pooled"]
    table.add_row(
        "[bold]pooled",
        *(f"[bold]{_cell(pooled.get(pooled_name(name)))}" + (" †" if name in SITE_LEVEL_METRICS else "") for name in shown),
    )
    union = [HISTOGRAM_POOLED_PREFIX + name if name in HISTOGRAM_POOLED_METRICS else "" for name in shown]
    if any(key in pooled for key in union):
        table.add_row("[bold]all test rows ‡", *(f"[bold]{_cell(pooled[key])}" if key in pooled else "" for key in union))
    if any(name in SITE_LEVEL_METRICS for name in shown):
        table.caption = "† test-row-weighted mean of the site values, not the metric on the union of test sets" + (
            "; ‡ on the union, from the sites' score histograms (histogram_pooled_<metric> in summary.json)"
            if any(key in pooled for key in union) else ""
        )
    console.print(table)
    if summary.get("baselines"):
        baselines = summary["baselines"]
        comparison = Table(title=f"baselines vs federated, {metric}")
        comparison.add_column("model")
        for column in baselines["columns"]:
            comparison.add_column(column, justify="right")
        for name, row in ordered_rows(baselines["rows"]):
            comparison.add_row(name, *(f"{row[column]:.3f}" for column in baselines["columns"]))
        console.print(comparison)
    console.print(f"run directory: [bold]{run_path}[/bold] (report.md, summary.json, metrics.jsonl)")


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _run(overrides: list[str], verbose: bool, *, resume: str = "") -> Path:
    from .simulate import simulate

    setup_logging(verbose)
    try:
        config = compose_config(overrides + ([f"run_id={resume}"] if resume else []))
        check_tracking(config)
        run_path = simulate(config, resume=bool(resume))
    except MedtwinError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(code=2) from error
    track(run_path)
    print_summary(run_path)
    return run_path


MULTIRUN_FLAGS = {"-m", "--multirun"}


def _multirun(arguments: list[str], *, resume: str) -> None:
    """`medtwin run -m ...`: a Hydra sweep, by the `@hydra.main` entry (experiments/run.py)."""
    if resume:
        raise typer.BadParameter("--resume continues one run; resume a sweep's run with `medtwin run --resume <run-id> runs_dir=<its job folder> ...`")
    from .run import main as hydra_main

    sys.argv = ["medtwin run", *arguments]  # Hydra reads its command line from sys.argv
    hydra_main()


@app.command(context_settings=EXTRA_ARGS)
def run(
    context: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Flower and Ray logs")] = False,
    resume: Annotated[str, typer.Option("--resume", help="continue this run id after its last checkpoint (same overrides)")] = "",
    federation: Annotated[
        Path | None, typer.Option("--federation", help="deployment: the coordinator's state dir (`medtwin coordinator start`)")
    ] = None,
    proposal: Annotated[Path | None, typer.Option("--proposal", help="deployment: the approved proposal (`medtwin propose`)")] = None,
    public_context: Annotated[Path | None, typer.Option("--public-context", help="deployment, crypto=ckks: the steward's public context")] = None,
) -> None:
    """Run a federation: simulated from configs/ with Hydra overrides (e.g. `task=breast_cancer strategy=fedprox`),
    or, with --federation and --proposal, on the coordinator's SuperLink with the hospitals' SuperNodes.
    With `-m` a Hydra sweep (e.g. `-m privacy.target_epsilon=1,3 seed=42,43`), one run per point; see experiments/run.py."""
    if federation is None and MULTIRUN_FLAGS & set(context.args):
        _multirun(list(context.args), resume=resume)
        return
    if federation is None:
        _run(list(context.args), verbose, resume=resume)
        return
    from .cli_deploy import submit_proposal

    setup_logging(verbose)
    if proposal is None:
        raise typer.BadParameter("--federation needs --proposal: the run the sites approved (`medtwin propose`)")
    try:
        run_path = submit_proposal(
            proposal, coordinator_state=federation, public_context=public_context, timeout_s=24 * 3600, resume=resume
        )
    except MedtwinError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(code=2) from error
    track(run_path)
    print_summary(run_path)


@app.command(context_settings=EXTRA_ARGS)
def demo(
    context: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    deployment: Annotated[
        bool, typer.Option("--deployment", help="every party as its own process: TLS SuperLink, 4 SuperNodes, chains, auditor")
    ] = False,
) -> None:
    """The demo: Fed-Heart-Disease across 4 hospitals with DP, CKKS aggregation and both chains, then an audit."""
    from medtwin.chain import chain_down

    if deployment:
        from .deploy_demo import main as deploy_demo

        raise typer.Exit(code=deploy_demo([]))

    overrides = DEMO_OVERRIDES + list(context.args)
    state_dir = compose_config(overrides).chain.state_dir
    try:
        run_path = _run(overrides, verbose)
        console.rule("independent audit (a separate process reading the chains and the artifact store)")
        audit = subprocess.run(
            [sys.executable, "-m", "medtwin.experiments.cli", "audit", "verify", run_path.name,
             "--state-dir", state_dir, "--runs-dir", str(run_path.parent)],
            check=False,
        )  # fmt: skip
    finally:
        chain_down(state_dir)
    console.print(f"chains stopped; their state stays in {state_dir} — `medtwin chain up` brings them back for `medtwin audit …`")
    if audit.returncode != 0:
        raise typer.Exit(code=audit.returncode)


def register_admin_commands() -> None:
    from .cli_admin import audit_app, chain_app, model_app, provision_command, site_app
    from .cli_deploy import (
        coordinator_app,
        propose_command,
        site_start_command,
        site_stop_command,
    )
    from .cli_federation import federation_app
    from .cli_site import site_approve_command

    site_app.command("approve")(site_approve_command)
    site_app.command("start")(site_start_command)
    site_app.command("stop")(site_stop_command)
    app.add_typer(coordinator_app, name="coordinator")
    app.command("propose", context_settings=EXTRA_ARGS)(propose_command)
    federation_app.command("init", help="Create a federation from the sites' public files (same as `medtwin provision`).")(provision_command)
    app.add_typer(federation_app, name="federation")

    app.add_typer(chain_app, name="chain")
    app.add_typer(audit_app, name="audit")
    app.add_typer(site_app, name="site")
    app.add_typer(model_app, name="model")
    from .cli_twin import twin_app

    app.add_typer(twin_app, name="twin")
    app.command("provision")(provision_command)


register_admin_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
