"""The `medtwin` command line: one entry point for researchers, coordinators, sites and auditors."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from medtwin.core.config import compose_config
from medtwin.core.errors import MedtwinError
from medtwin.core.report import ordered_rows

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

DEMO_OVERRIDES = ["task=fed_heart_disease", "strategy=fedavg"]
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
    table = Table(title=f"federated model, {metric} per site")
    table.add_column("site")
    table.add_column(metric, justify="right")
    for site, values in summary["final_metrics"]["sites"].items():
        table.add_row(site, f"{values[metric]:.4f}")
    pooled = summary["final_metrics"]["pooled"]
    table.add_row("[bold]pooled", f"[bold]{pooled.get(metric, float('nan')):.4f}")
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


def _run(overrides: list[str], verbose: bool) -> Path:
    from .simulate import simulate

    setup_logging(verbose)
    try:
        config = compose_config(overrides)
        run_path = simulate(config)
    except MedtwinError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(code=2) from error
    print_summary(run_path)
    return run_path


@app.command(context_settings=EXTRA_ARGS)
def run(
    context: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Flower and Ray logs")] = False,
) -> None:
    """Run a simulated federation composed from configs/ with Hydra overrides, e.g. `task=breast_cancer strategy=fedprox`."""
    _run(list(context.args), verbose)


@app.command(context_settings=EXTRA_ARGS)
def demo(
    context: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """The demo: Fed-Heart-Disease across 4 hospitals, with baselines, ending with the run report."""
    _run(DEMO_OVERRIDES + list(context.args), verbose)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
