"""`medtwin chain …`, `medtwin audit …`, `medtwin provision`, `medtwin site …`: operating the federation."""

from __future__ import annotations

import re

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from medtwin.core.config import compose_config

console = Console()
chain_app = typer.Typer(no_args_is_help=True, help="Start, stop and inspect the two chains (anvil nodes).")
audit_app = typer.Typer(no_args_is_help=True, help="Check what the chains say, without trusting the coordinator.")
site_app = typer.Typer(no_args_is_help=True, help="What a hospital site runs: its identity, joining, HE keys.")

StateDir = Annotated[Path, typer.Option("--state-dir", help="chain state folder (pidfiles, deployment.json, --state files)")]
RunsDir = Annotated[Path, typer.Option("--runs-dir", help="the coordinator's runs/ folder (artifact stores)")]
AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]
Federation = Annotated[
    Path | None,
    typer.Option("--federation", help="folder with federation.json + the admin-signed chains.json (instead of --state-dir)"),
]


def _chain_config(overrides: list[str]):
    config = compose_config(["chain=anvil", *overrides])
    return config.chain


@chain_app.command("up", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def chain_up_command(context: typer.Context) -> None:
    """Start both anvil nodes (state persisted with --state), deploy the contracts once, and reconcile:
    writes a node lost are sent again from the journal, queued writes go out, in order. Overrides: chain.*"""
    from medtwin.chain import chain_up, status_table

    config = _chain_config(list(context.args))
    console.print(status_table(chain_up(config, config.state_dir)))
    _reconcile(config)


@chain_app.command("flush", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def chain_flush_command(context: typer.Context) -> None:
    """Reconcile the journal with both chains (send again what a node lost) and send the queued writes,
    in order; report what was sent. Exit 1 if anything still waits. Overrides: chain.*"""
    config = _chain_config(list(context.args))
    if not _reconcile(config):
        raise typer.Exit(code=1)


def _reconcile(config) -> bool:  # noqa: ANN001 - a ChainConfig
    """Reconcile both chains; print per chain what was re-sent, sent from the outbox, refused and still waits."""
    from medtwin.chain import ChainError, open_session

    try:
        session = open_session(config)
        results = session.reconcile()
    except ChainError as error:
        console.print(f"[red]cannot open the chains in {config.state_dir}:[/red] {error}")
        raise typer.Exit(code=2) from error
    for role, result in results.items():
        flush = result.flush
        console.print(
            f"{role} chain: journal {result.journaled} write(s), {result.checked} checked, {len(result.resent)} lost and sent again "
            f"({', '.join(r.call for r in result.resent) or 'none'}), {result.finalized} finalized; "
            f"outbox: {len(flush.mined)} queued write(s) sent ({', '.join(r.call for r in flush.mined) or 'none'}), "
            f"{flush.already_applied} already on chain, {len(flush.failed)} refused, {flush.remaining} still queued",
            soft_wrap=True,
        )
        for failure in (*result.refused, *flush.failed):
            console.print(f"  [red]refused:[/red] {failure}")
        if result.unfinished:
            console.print(f"  [yellow]{result.unfinished} journaled write(s) not checked yet (node unreachable or signer missing)[/yellow]")
    return all(result.complete for result in results.values())


@chain_app.command("down")
def chain_down_command(state_dir: StateDir = Path(".medtwin/chain")) -> None:
    """Stop the nodes recorded in the state folder, by PID; their state stays for the next `up`."""
    from medtwin.chain import chain_down

    stopped = chain_down(state_dir)
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@chain_app.command("status")
def chain_status_command(state_dir: StateDir = Path(".medtwin/chain")) -> None:
    """Health, chain ids, contract addresses and block heights of both chains."""
    from medtwin.chain import chain_status, status_table

    console.print(status_table(chain_status(state_dir)))


def _artifact_store(runs_dir: Path, target: str):
    from medtwin.core.artifacts import ArtifactStore

    candidate = runs_dir / target / "artifacts"
    if candidate.is_dir():
        return ArtifactStore(candidate)
    digest = target.lower().removeprefix("0x")
    if re.fullmatch(r"[0-9a-f]{64}", digest):  # a model hash: the run folder whose store holds it (a run id is no digest)
        for folder in sorted(runs_dir.glob("*/artifacts")):
            if folder.is_dir() and ArtifactStore(folder).exists(digest):
                return ArtifactStore(folder)
    return ArtifactStore(candidate)  # absent: the audit reports every artifact as missing


@audit_app.command("lineage")
def audit_lineage_command(
    target: Annotated[str, typer.Argument(help="run id or model hash")],
    state_dir: StateDir = Path(".medtwin/chain"),
    runs_dir: RunsDir = Path("runs"),
    as_json: AsJson = False,
    federation: Federation = None,
) -> None:
    """Rounds, participating sites, their approvals at the time, epsilon, HE parameters, dataset commitments."""
    from medtwin.chain import audit_lineage, lineage_table

    from .cli_federation import auditor_session

    report = audit_lineage(auditor_session(state_dir, federation), _artifact_store(runs_dir, target), target)
    console.print_json(report.to_json()) if as_json else console.print(lineage_table(report))


@audit_app.command("access")
def audit_access_command(
    site: Annotated[str, typer.Option("--site", help="only this site")] = "",
    run: Annotated[str, typer.Option("--run", help="only this run")] = "",
    state_dir: StateDir = Path(".medtwin/chain"),
    as_json: AsJson = False,
    federation: Federation = None,
) -> None:
    """The access log: every admission, rejection and export decision, and governance events."""
    from medtwin.chain import access_table, audit_access

    from .cli_federation import auditor_session

    report = audit_access(auditor_session(state_dir, federation), site_id=site, run_id=run)
    console.print_json(report.to_json()) if as_json else console.print(access_table(report))


@audit_app.command("verify")
def audit_verify_command(
    run: Annotated[str, typer.Argument(help="run id")],
    state_dir: StateDir = Path(".medtwin/chain"),
    runs_dir: RunsDir = Path("runs"),
    as_json: AsJson = False,
    federation: Federation = None,
) -> None:
    """Recompute every Merkle root and artifact hash of a run against the data chain; exit 1 on any mismatch."""
    from medtwin.chain import audit_verify, verify_table

    from .cli_federation import auditor_session

    report = audit_verify(auditor_session(state_dir, federation), _artifact_store(runs_dir, run), run)
    console.print_json(report.to_json()) if as_json else console.print(verify_table(report))
    if not report.ok:
        raise typer.Exit(code=1)


@contextmanager
def _refusals():
    """Identity refusals (bad public file, existing key, wrong manifest) end the command with their message."""
    from medtwin.core.identity import IdentityError

    try:
        yield
    except IdentityError as error:
        console.print(f"refused: {error}", style="red", markup=False, highlight=False)
        raise typer.Exit(code=1) from error


def provision_command(
    out: Annotated[Path, typer.Option("--out", help="new, empty folder for the CA, the coordinator kit and federation.json")],
    site_public: Annotated[
        list[Path], typer.Option("--site-public", help="a site's site-public.json from `medtwin site init` (repeat)")
    ],
    federation: Annotated[str, typer.Option("--federation", help="federation name")] = "medtwin",
    coordinator_host: Annotated[str, typer.Option("--coordinator-host")] = "127.0.0.1",
) -> None:
    """Admin: build a federation from the sites' PUBLIC files: CA, coordinator TLS certificate, federation.json."""
    from medtwin.core.identity import provision_federation

    with _refusals():
        result = provision_federation(
            out, federation_name=federation, site_public_files=site_public, coordinator_host=coordinator_host
        )
    console.print(f"federation [bold]{federation}[/bold] with {len(result.manifest.sites)} site(s) under {result.root}")
    for entry in result.manifest.sites:
        console.print(f"  {entry.site_id}: signing key {entry.signing_key_fingerprint[:16]}…")
    console.print(f"  CA (keep ca_key.pem offline): {result.ca_dir}")
    console.print(f"  coordinator kit: {result.coordinator_kit} (TLS key; no site secrets)")
    console.print(f"send {result.manifest_path} to every site: `medtwin site join --kit DIR --manifest federation.json`")


@site_app.command("init")
def site_init_command(
    kit: Annotated[Path, typer.Option("--kit", help="new kit folder on this site's machine")],
    site_id: Annotated[str, typer.Option("--site-id", help="this site's id in the federation")],
) -> None:
    """Create this site's own signing and key-agreement keys (they never leave the kit); print the public file."""
    from medtwin.core.identity import init_site_identity

    with _refusals():
        public_path = init_site_identity(kit, site_id=site_id)
    console.print(f"identity of site [bold]{site_id}[/bold] created in {kit} (private keys 0600, never copied)")
    console.print(f"hand this public file to the federation admin: {public_path}")
    console.print_json(public_path.read_text(encoding="utf-8"))


@site_app.command("join")
def site_join_command(
    kit: Annotated[Path, typer.Option("--kit", help="this site's kit (from `medtwin site init`)")],
    manifest: Annotated[Path, typer.Option("--manifest", help="federation.json from the admin")],
) -> None:
    """Check the admin's federation.json lists exactly this site's keys; install it and the CA certificate."""
    from medtwin.core.identity import join_federation

    with _refusals():
        site_kit = join_federation(kit, manifest)
    joined = site_kit.manifest
    console.print(f"site [bold]{site_kit.site_id}[/bold] joined federation [bold]{joined.federation_name}[/bold]")
    console.print(f"  sites: {', '.join(joined.site_ids)}")
    console.print(f"  coordinator: {joined.coordinator_host} (TLS {joined.coordinator_tls_fingerprint[:16]}…)")
    console.print(f"  CA fingerprint: {joined.ca_fingerprint}")


@site_app.command("keygen", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def site_keygen_command(
    context: typer.Context,
    kit: Annotated[Path, typer.Option("--kit", help="the key steward's site kit")],
    num_parameters: Annotated[int, typer.Option("--num-parameters", help="model size the keys are for")],
    num_sites: Annotated[int, typer.Option("--num-sites")],
    max_total_examples: Annotated[int, typer.Option("--max-total-examples")] = 10_000,
    outbox: Annotated[
        Path | None, typer.Option("--outbox", help="where envelopes and the public context go (default: KIT/he-outbox/<key id>)")
    ] = None,
) -> None:
    """Key steward: generate a new CKKS key set, wrap it for every other site, publish the public context.
    Extra arguments are the run's overrides (task=… privacy=dp privacy.target_epsilon=3 strategy=…): under
    DP-SGD the precision is then derived from the run's DP noise, exactly as in simulation."""
    from medtwin.core.he import run_ckks_parameters
    from medtwin.core.identity import steward_generate_he_keys
    from medtwin.core.tasks import get_task

    config = compose_config(["crypto=ckks", *context.args])
    parameters, precision = run_ckks_parameters(
        config, num_parameters=num_parameters, num_sites=num_sites, max_total_examples=max_total_examples,
        grouped_by_patient=get_task(config.task).groups_rows_by_patient,
    )  # fmt: skip
    with _refusals():
        distribution = steward_generate_he_keys(kit, parameters, outbox_dir=outbox)
    console.print(f"CKKS key set [bold]{distribution.key_id}[/bold]: N={parameters.poly_modulus_degree}, primes {parameters.coeff_mod_bit_sizes}")
    console.print(f"  precision target {precision.max_relative_error:.3g} ({precision.derived_from}: {precision.reason})")
    console.print(f"  secret context kept in this kit: {distribution.secret_context_path} (0600)")
    console.print(f"  public context for the coordinator: {distribution.public_context_path}")
    for site_id, path in sorted(distribution.envelope_paths.items()):
        console.print(f"  envelope for {site_id}: {path}")


@site_app.command("install-key")
def site_install_key_command(
    kit: Annotated[Path, typer.Option("--kit", help="this site's kit")],
    envelope: Annotated[Path, typer.Option("--envelope", help="the steward's envelope for this site")],
) -> None:
    """Open the steward's envelope with this site's key; store the CKKS secret under its key id (never replacing one)."""
    from medtwin.core.identity import install_he_secret, installed_he_key_ids

    with _refusals():
        path = install_he_secret(kit, envelope)
    console.print(f"HE key set [bold]{path.parent.name}[/bold] installed at {path}")
    console.print(f"  key sets in this kit: {', '.join(installed_he_key_ids(kit))}")


model_app = typer.Typer(no_args_is_help=True, help="Release a trained model (an explicit, logged act of a key-holding site).")


@model_app.command("export")
def model_export_command(
    run: Annotated[str, typer.Argument(help="run id")],
    site: Annotated[str, typer.Option("--site", help="the exporting site's id")],
    out: Annotated[Path, typer.Option("--out", help="where to write the plaintext model (torch state_dict)")],
    kit: Annotated[Path | None, typer.Option("--kit", help="the site's kit (needed to decrypt a CKKS run)")] = None,
    state_dir: StateDir = Path(".medtwin/chain"),
    runs_dir: RunsDir = Path("runs"),
) -> None:
    """Decrypt the run's final model at a site, write it, and log the export on both chains."""
    import io

    import torch

    from medtwin.chain import Decision, open_session
    from medtwin.client.codec import CkksSiteCodec, PlainSiteCodec
    from medtwin.core.config import config_from_yaml
    from medtwin.core.protocol import record_from_bytes
    from medtwin.core.rundir import RunDirectory, atomic_write_bytes
    from medtwin.core.tasks import get_task

    run_dir = RunDirectory(runs_dir, run)
    config_text = (run_dir.path / "config.yaml").read_text()
    config = config_from_yaml(config_text)
    session = open_session(replace_state_dir(config.chain, state_dir))
    # the site trusts the chains, not the coordinator's files: the model is the last anchored aggregate
    # of a run whose config this site approved; summary.json names nothing it decrypts
    model_hash, problem = anchored_model(session, site=site, run=run, config_text=config_text)
    admitted = problem is None and session.auth.is_admitted(site_id=site, run_id=run)
    if problem is None and not admitted:
        problem = f"{site} is not admitted to run {run} on the authorization chain"
    session.auth.record_decisions(
        [Decision(action="export_model", granted=admitted, reason="ok" if admitted else "not_verified", site_id=site,
                  subject=model_hash or "0" * 64)],
        run_id=run,
        round_index=0,
        batch_label=f"export:{site}",
    )  # fmt: skip
    if not admitted:
        console.print(f"[red]refused:[/red] {problem} (logged)")
        raise typer.Exit(code=1)
    if config.crypto.name == "ckks" and kit is None:
        raise typer.BadParameter("a CKKS run can only be decrypted with the site's kit: pass --kit")
    codec = CkksSiteCodec.from_kit(str(kit), config.crypto.key_id) if config.crypto.name == "ckks" else PlainSiteCodec()
    average, _ = codec.average(record_from_bytes(_artifact_store(runs_dir, run).get(model_hash)))
    model = get_task(config.task).model_with_weights(average, seed=config.seed)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(out, buffer.getvalue(), mode=0o600)
    receipt = session.data.release_model(model_hash=model_hash, run_id=run, site_id=site)
    console.print(f"model {model_hash[:16]}… of run {run} written to {out}; release {receipt.status} on the data chain")


def anchored_model(session, *, site: str, run: str, config_text: str) -> tuple[str, str | None]:
    """(model hash, problem): the run's last anchored aggregate, if `site` approved exactly this config."""
    from medtwin.core.hashing import config_hash

    approval = session.auth.approval(site_id=site, run_id=run)
    if approval is None:
        return "", f"{site} never approved run {run} on the authorization chain"
    if approval.config_hash.removeprefix("0x") != config_hash(config_text):
        return "", f"the run directory's config.yaml is not the config {site} approved for run {run}"
    anchors = session.data.anchors(run)
    if not anchors:
        return "", f"run {run} has no anchored round on the data chain"
    return anchors[-1].aggregate_hash.removeprefix("0x").lower(), None


def replace_state_dir(chain, state_dir: Path):
    from dataclasses import replace

    return replace(chain, state_dir=str(state_dir))
