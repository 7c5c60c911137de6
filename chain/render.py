"""rich tables for `medtwin chain status` and `medtwin audit …` (reports also have `to_json`).

Every cell, title and caption is plain `Text`, never rich markup: site ids, reasons and mismatch details come
from chains and files a coordinator writes, and a "[/x]" in one would otherwise stop the table from printing."""

from __future__ import annotations

import datetime as dt

from rich.table import Table
from rich.text import Text

from .audit import AccessReport, LineageReport, VerifyReport
from .lifecycle import ChainStatus

__all__ = ["access_table", "lineage_table", "status_table", "verify_table"]


def _when(timestamp: int) -> str:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"


def _row(table: Table, *cells: str) -> None:
    table.add_row(*(Text(cell) for cell in cells))


def _short(digest: str) -> str:
    return digest[:12] + "…" if len(digest) > 12 else digest


def status_table(status: ChainStatus) -> Table:
    table = Table(title=Text(f"chains ({status.backend}) — {status.state_dir}"))
    for column in ("chain", "url", "pid", "up", "chain id", "block", "contract", "queued", "failed"):
        table.add_column(column)
    for node in status.nodes:
        _row(
            table,
            node.role,
            node.rpc_url or "-",
            str(node.pid or "-"),
            "yes" if node.reachable else "NO",
            str(node.chain_id or "-"),
            str(node.block_number if node.block_number is not None else "-"),
            f"{node.contract} {_short(node.contract_address)}" + ("" if node.contract_present else " (absent)"),
            str(node.pending_writes),
            str(node.failed_writes),
        )
    return table


def lineage_table(report: LineageReport) -> Table:
    run = report.run
    title = f"lineage of {report.target}" + (f" — run {run.run_id}, task {run.task}" if run else "")
    table = Table(title=Text(title))
    for column in ("round", "anchored (UTC)", "site", "update", "epsilon", "approved then", "admitted", "HE bound", "root"):
        table.add_column(column)
    for round_lineage in report.rounds:
        for position, participant in enumerate(round_lineage.participants or (None,)):
            first = position == 0
            _row(
                table,
                str(round_lineage.round_index) if first else "",
                _when(round_lineage.anchored_at) if first else "",
                participant.site_id if participant else "?",
                _short(participant.update_sha256) if participant else "-",
                "-" if participant is None or participant.epsilon is None else f"{participant.epsilon:.4g}",
                ("yes" if participant.approval_valid_then else "NO") if participant else "-",
                ("yes" if participant.admitted_at else "no") if participant else "-",
                f"{round_lineage.he_error_bound:.3g}" if first else "",
                _short(round_lineage.update_root) if first else "",
            )
    caption = [f"datasets: {len(report.datasets)} commitments", f"models: {len(report.models)}"]
    if len(report.origins) > 1:
        caption.append(f"this model came out of {len(report.origins)} runs: {', '.join(report.origins)}")
    caption += [f"problem: {problem}" for problem in report.problems]
    table.caption = Text("\n".join(caption))
    return table


def access_table(report: AccessReport) -> Table:
    scope = " ".join(part for part in (f"site {report.site_id}" if report.site_id else "", f"run {report.run_id}" if report.run_id else "") if part)
    table = Table(title=Text(f"access decisions {scope}".strip()))
    for column in ("time (UTC)", "site", "actor", "action", "granted", "reason", "round", "subject"):
        table.add_column(column)
    for record in report.decisions:
        _row(
            table,
            _when(record.timestamp),
            record.site_id or _short(record.site_key),
            _short(record.actor),
            record.action,
            "yes" if record.granted else "DENIED",
            record.reason,
            str(record.round_index),
            _short(record.subject),
        )
    table.caption = Text(f"{len(report.governance)} governance events (roles, sites, approvals, grants)")
    return table


def verify_table(report: VerifyReport) -> Table:
    verdict = "OK" if report.ok else f"{len(report.mismatches)} MISMATCH(ES)"
    table = Table(title=Text(f"verify run {report.run_id}: {verdict}"))
    for column in ("round", "kind", "detail"):
        table.add_column(column)
    for mismatch in report.mismatches:
        _row(table, str(mismatch.round_index), mismatch.kind, mismatch.detail)
    caption = f"{report.rounds_checked} rounds, {report.artifacts_checked} artifacts re-hashed in {report.elapsed_s:.2f} s"
    if report.completeness:
        caption += f"; completeness {report.completeness}"
    table.caption = Text(caption)
    return table
