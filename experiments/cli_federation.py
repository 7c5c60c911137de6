"""`medtwin federation …`: what the federation admin runs (public material only, and the CA key).

    medtwin federation init --out ADMIN --site-public a.json --site-public b.json   # = medtwin provision
    medtwin federation publish-chains --admin-dir ADMIN --state-dir CHAIN            # signed chains.json

`publish-chains` signs, with the federation CA's key, which chains (ids, contract addresses, RPC
URLs) belong to the federation; auditors then run `medtwin audit … --federation ADMIN_PUBLIC`
with only federation.json + chains.json and the artifact store — never the coordinator's files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
federation_app = typer.Typer(no_args_is_help=True, help="What the federation admin runs: manifest, CA, signed chain record.")


@federation_app.command("publish-chains")
def publish_chains_command(
    admin_dir: Annotated[Path, typer.Option("--admin-dir", help="the admin's folder from `medtwin provision` (ca/ca_key.pem)")],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="chain state folder whose deployment.json describes the chains")],
    auth_rpc_url: Annotated[str, typer.Option("--auth-rpc-url", help="URL auditors use for the auth chain")] = "",
    data_rpc_url: Annotated[str, typer.Option("--data-rpc-url", help="URL auditors use for the data chain")] = "",
) -> None:
    """Sign chains.json (chain ids, contract addresses, RPC URLs) with the federation CA's key."""
    from medtwin.chain import read_deployment
    from medtwin.core.identity import CHAINS_FILE, load_manifest, sign_chain_record

    deployment = read_deployment(state_dir)
    if deployment is None:
        console.print(f"[red]no deployment.json in {state_dir}[/red]: start the chains first (`medtwin chain up`)")
        raise typer.Exit(code=2)
    urls = {"auth": auth_rpc_url, "data": data_rpc_url}
    chains = {}
    for role in ("auth", "data"):
        chain = deployment.chain(role)
        chains[role] = {
            "chain_id": chain.chain_id, "address": chain.address, "rpc_url": urls[role] or chain.rpc_url,
            "contract": chain.contract, "deploy_block": chain.deploy_block, "source_sha256": chain.source_sha256,
        }  # fmt: skip
    manifest = load_manifest(admin_dir / "federation.json")
    path = sign_chain_record(ca_key_path=admin_dir / "ca" / "ca_key.pem", manifest=manifest, chains=chains, out_path=admin_dir / CHAINS_FILE)
    console.print(f"signed {path}: auth chain {chains['auth']['chain_id']} {chains['auth']['address']}, "
                  f"data chain {chains['data']['chain_id']} {chains['data']['address']} — give it to auditors with federation.json")  # fmt: skip


def auditor_session(state_dir: Path, federation: Path | None):
    """An auditor's read-only view: the admin-signed chain record if given, else a chain state folder."""
    from medtwin.chain import open_readonly, open_signed_readonly
    from medtwin.core.errors import MedtwinError
    from medtwin.core.identity import CHAINS_FILE, load_chain_record, load_manifest

    try:
        if federation is None:
            return open_readonly(state_dir)
        folder = federation if federation.is_dir() else federation.parent
        manifest = load_manifest(folder / "federation.json")
        return open_signed_readonly(load_chain_record(folder / CHAINS_FILE, manifest))
    except MedtwinError as error:
        console.print(f"[red]audit refused:[/red] {error}")
        raise typer.Exit(code=2) from None
