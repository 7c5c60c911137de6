"""`medtwin site approve`: a hospital reads a run proposal against its own site file and approves it.

    medtwin site approve proposal.yaml --site-file /etc/medtwin/site.yaml

Shows what the coordinator asks (task, rounds, local steps, DP request, aggregation), the hashes
the approval binds (run id + config hash + code hash of the medtwin installed here) and what the
run will spend against the site's lifetime budget; records the approval in the site's state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def site_approve_command(
    proposal: Annotated[Path, typer.Argument(help="the run proposal (the coordinator's config YAML)")],
    site_file: Annotated[Path, typer.Option("--site-file", help="this hospital's site file")],
    yes: Annotated[bool, typer.Option("--yes", help="approve without asking")] = False,
) -> None:
    """Check a run proposal against this site's file and budget, show it, and record the approval."""
    from medtwin.client.proposal import ProposalRefused, parse_proposal
    from medtwin.client.site import open_ledger
    from medtwin.client.site_file import load_site_file
    from medtwin.client.site_state import SiteApprovals
    from medtwin.core.hashing import code_hash

    site = load_site_file(site_file)
    text = proposal.read_text(encoding="utf-8")
    try:
        accepted = parse_proposal(text, site)
    except ProposalRefused as refused:
        console.print(f"[red]this site cannot run this proposal ({refused.code}):[/red] {refused.reason}")
        raise typer.Exit(code=1) from None
    config = accepted.config
    dp = config.privacy.name == "dp"
    ledger = open_ledger(site)
    spent = ledger.total_epsilon()
    run_epsilon = config.privacy.target_epsilon if dp else float("inf")
    table = Table(title=f"run {accepted.run_id} proposed to {site.site_id}", show_header=False)
    for name, value in [
        ("task", config.task.name),
        ("rounds x local steps", f"{config.federation.num_rounds} x {config.strategy.local_steps} (batch {config.strategy.batch_size})"),
        ("aggregation", config.crypto.name + (f" (key set {config.crypto.key_id})" if config.crypto.key_id else "")),
        ("privacy requested", f"DP ε={config.privacy.target_epsilon:g}, δ={config.privacy.target_delta:g}" if dp else "none"),
        ("site policy", f"per run ε<={site.privacy.max_epsilon:g}, lifetime ε<={site.privacy.max_total_epsilon:g}, require DP: {site.privacy.require_dp}"),
        ("budget", f"spent ε={spent:.3g}; after this run at most ε={spent + min(run_epsilon, site.privacy.max_epsilon):.3g}"),
        ("config hash", accepted.config_hash),
        ("code hash", code_hash()),
    ]:
        table.add_row(name, value)
    console.print(table)
    if not dp and site.privacy.require_dp:
        console.print("[red]this site requires DP and the proposal asks for none: it would refuse every round[/red]")
        raise typer.Exit(code=1)
    if site.approvals != "local":
        console.print("[red]this site approves runs on the authorization chain (site file `approvals: chain`)[/red]")
        raise typer.Exit(code=1)
    if not yes and not typer.confirm(f"approve run {accepted.run_id} for {site.site_id}?"):
        raise typer.Exit(code=1)
    added = SiteApprovals(site.state_dir).approve(run_id=accepted.run_id, config_hash=accepted.config_hash, code_hash=code_hash())
    console.print(f"{'approved' if added else 'already approved'}: run {accepted.run_id} (recorded in {site.state_dir})")
