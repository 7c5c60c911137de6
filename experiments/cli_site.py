"""`medtwin site approve`: a hospital reads a run proposal against its own site file and approves it.

    medtwin site approve proposal.yaml --site-file /etc/medtwin/site.yaml

Shows every field the site would take from the proposal (seed, task, strategy, rounds, DP request,
aggregation), the hashes the approval binds (run id + config hash + code hash of the medtwin
installed here) and, plainly, what the run may spend — DP training plus any DP metric releases —
against the site's per-run and lifetime budgets; then records the approval in the site's state.

Every value shown comes from an untrusted proposal: each is escaped (`rich.markup.escape`) and
newlines are shown as `\\n`, so a value can neither style the table nor fake a row of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from medtwin.client.proposal import RunProposal
    from medtwin.client.site_file import SiteFile

console = Console()


def _shown(value: object) -> str:
    """`value` as inert table text: Rich markup escaped, line breaks and other control characters made visible."""
    text = str(value)
    text = "".join(character if character.isprintable() else repr(character)[1:-1] for character in text)
    return escape(text)


def _spend_lines(accepted: RunProposal, site: SiteFile, *, spent_total: float) -> list[tuple[str, str]]:
    """What the run may spend at this site, in plain words: DP training + DP metric releases."""
    config = accepted.config
    policy = site.privacy
    rounds = config.federation.num_rounds
    dp = config.privacy.name == "dp"
    per_run_cap = min(config.privacy.target_epsilon, policy.max_epsilon) if dp else float("inf")
    training = (
        f"up to ε={per_run_cap:g} (DP target {config.privacy.target_epsilon:g}, site max_epsilon {policy.max_epsilon:g})"
        if dp
        else "NOT differentially private: no ε bound"
    )
    evaluation = site.evaluation
    if evaluation.release == "dp":
        releases_epsilon = evaluation.epsilon_per_release * rounds
        releases = f"ε={evaluation.epsilon_per_release:g} per release x {rounds} round(s) = ε={releases_epsilon:g}"
    else:
        releases_epsilon = 0.0
        detail = "exactly" if evaluation.release == "exact" else f"rounded to {evaluation.decimals} decimals"
        releases = f"none counted: metrics are released {detail}, without DP noise"
    worst = per_run_cap + releases_epsilon
    after = spent_total + worst
    lifetime = policy.max_total_epsilon
    total = (
        f"at most ε={worst:g} at this site (training + metric releases); lifetime spend {spent_total:.3g} -> "
        f"at most {after:.3g} of {lifetime:g}"
        if dp
        else "unbounded: the run trains without DP"
    )
    if dp and after > lifetime:
        total += f" — the lifetime limit stops this run {after - lifetime:.3g} short of its request"
    return [("will spend: training", training), ("will spend: metric releases", releases), ("will spend: total", total)]


def _rows(accepted: RunProposal, site: SiteFile, *, spent_total: float, code: str) -> list[tuple[str, str]]:
    config = accepted.config
    task, strategy, privacy, crypto = config.task, config.strategy, config.privacy, config.crypto
    hidden = f", hidden units {task.csv.hidden_units}" if task.name == "csv" and task.csv is not None else ""
    policy = site.privacy
    return [
        ("run id", accepted.run_id),
        ("seed", config.seed),
        ("task", f"{task.name}{hidden}"),
        ("strategy", f"{strategy.name} (proximal_mu {strategy.proximal_mu:g})"),
        ("optimizer", f"{strategy.optimizer}, learning rate {strategy.learning_rate:g}"),
        ("rounds x local steps", f"{config.federation.num_rounds} x {strategy.local_steps} (batch {strategy.batch_size})"),
        ("min sites per round", config.federation.min_sites),
        (
            "privacy requested",
            f"DP ε={privacy.target_epsilon:g}, δ={privacy.target_delta:g}, clipping norm {privacy.max_grad_norm:g}, "
            f"accountant {privacy.accountant} (tolerance {privacy.epsilon_tolerance:g}), "
            f"grad_sample_mode {privacy.grad_sample_mode}, secure_mode {privacy.secure_mode}"
            if privacy.name == "dp"
            else f"none (privacy.name {privacy.name})",
        ),
        ("aggregation", f"{crypto.name}, key set {crypto.key_id or '(none)'}"),
        (
            "site policy",
            f"per run ε<={policy.max_epsilon:g}, δ<={policy.max_delta:g}; lifetime ε<={policy.max_total_epsilon:g}; "
            f"require DP: {policy.require_dp}; metrics released: {site.evaluation.release}",
        ),
        *_spend_lines(accepted, site, spent_total=spent_total),
        ("config hash", accepted.config_hash),
        ("code hash", code),
    ]


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
        console.print(f"[red]this site cannot run this proposal ({_shown(refused.code)}):[/red] {_shown(refused.reason)}")
        raise typer.Exit(code=1) from None
    config = accepted.config
    code = code_hash()
    table = Table(title=f"run {_shown(accepted.run_id)} proposed to {_shown(site.site_id)}", show_header=False)
    for name, value in _rows(accepted, site, spent_total=open_ledger(site).total_epsilon(), code=code):
        table.add_row(_shown(name), _shown(value))
    console.print(table)
    if config.privacy.name != "dp" and site.privacy.require_dp:
        console.print("[red]this site requires DP and the proposal asks for none: it would refuse every round[/red]")
        raise typer.Exit(code=1)
    if not yes and not typer.confirm(f"approve run {accepted.run_id} for {site.site_id}?"):
        raise typer.Exit(code=1)
    if site.approvals == "chain":  # signed with the site's own chain account, from its kit
        from medtwin.chain import open_session
        from medtwin.core.config import ChainConfig

        from .chain_wiring import approve_run_on_chain

        session = open_session(ChainConfig(name="anvil", state_dir=str(site.chain_state_dir)))
        added = approve_run_on_chain(
            session, site_id=site.site_id, kit_dir=site.kit_dir, run_id=accepted.run_id, proposal_text=text
        )
        console.print(f"{'approved' if added else 'already approved'}: run {_shown(accepted.run_id)} on the authorization chain")
        return
    added = SiteApprovals(site.state_dir).approve(run_id=accepted.run_id, config_hash=accepted.config_hash, code_hash=code)
    state = _shown(site.state_dir)
    console.print(f"{'approved' if added else 'already approved'}: run {_shown(accepted.run_id)} (recorded in {state})")
