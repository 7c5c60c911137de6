"""The Flower apps a SuperLink and SuperNodes load (`[tool.flwr.app.components]`), with the chains wired in.

The roles' apps (`server/app.py`, `client/app.py`) may not import `medtwin.chain`; this wiring module
gives them their chain objects, the same way in every engine:

- the coordinator opens its chain session from the run's config (`chain.*`) and records admissions,
  decisions, round anchors and lineage through `ChainProvenance`;
- a site whose file says `approvals: chain` reads its approval and each round's anchor from the
  chain folder its own site file names (`chain.state_dir`) — never from the coordinator.

`medtwin run` (Ray) and `flwr run` / deployed SuperNodes use these same factories.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from medtwin.chain import ChainSession
from medtwin.client.app import build_client_app
from medtwin.client.site_file import SiteFile
from medtwin.core.config import MedtwinConfig
from medtwin.core.identity import load_manifest
from medtwin.core.runconfig import config_from_run_config
from medtwin.server.app import RESUME_KEY, CoordinatorSetup, run_federation

from .chain_wiring import ChainApprovalCheck, ChainProvenance, open_chains
from .prompt_flower import prompt_object_pulls

__all__ = ["PromptGrid", "client_app", "coordinator_provenance", "server_app", "site_approval_check"]


def coordinator_provenance(
    config: MedtwinConfig, setup: CoordinatorSetup, *, session: ChainSession | None = None
) -> ChainProvenance | None:
    """The coordinator's chain recorder for this run (None when the run uses no chain); `session`
    reuses an open one (an embedded chain exists only in the process that opened it)."""
    if config.chain.name == "none":
        return None
    manifest = load_manifest(setup.manifest_path) if setup.manifest_path else None
    artifacts_root = Path(config.runs_dir) / config.run_id / "artifacts"
    return ChainProvenance(
        session=session or open_chains(config.chain), artifacts_root=artifacts_root, manifest=manifest,
        outage_timeout_s=config.chain.outage_timeout_s, drain_wait_s=config.chain.tx_timeout_s,
    )  # fmt: skip


def site_approval_check(site_file: SiteFile) -> ChainApprovalCheck | None:
    """A site's reader of the chains, from its own site file (`chain.state_dir`)."""
    if site_file.approvals != "chain" or site_file.chain_state_dir is None:
        return None
    return ChainApprovalCheck(
        state_dir=str(site_file.chain_state_dir), site_state_dir=str(site_file.state_dir), anchor_wait_s=site_file.anchor_wait_s
    )


class PromptGrid:
    """The Grid Flower hands a deployed ServerApp, with replies pulled every `poll_s`: Flower's own
    `send_and_receive` there sleeps 3 s between pulls, ~1.5 s added to every phase on average. Same
    contract: push the instructions, return the replies that arrived before `timeout`."""

    def __init__(self, grid: Grid, *, poll_s: float = 0.25) -> None:
        self._grid = grid
        self.poll_s = poll_s

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        pending = {message_id for message_id in self._grid.push_messages(messages) if message_id}  # a failed push has none
        deadline = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while pending:
            pulled = list(self._grid.pull_messages(pending))
            replies += pulled
            pending -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not pending or (timeout is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_s if timeout is None else min(self.poll_s, max(0.0, deadline - time.monotonic())))
        return replies


server_app = ServerApp()


@server_app.main()
def _coordinate(grid: Grid, context: Context) -> None:
    prompt_object_pulls()  # replies are pulled as soon as they are there, not after Flower's 1 s + 2 s backoff
    run_config = dict(context.run_config)
    config = config_from_run_config(run_config)
    setup = CoordinatorSetup.from_run_config(run_config)
    resume = str(run_config.get(RESUME_KEY, "")).lower() == "true"
    run_federation(PromptGrid(grid), config, setup, coordinator_provenance(config, setup), resume=resume)


client_app = build_client_app(approval_check_for=site_approval_check)
