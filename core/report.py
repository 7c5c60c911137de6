"""Render report.md (and its PNG plots) from summary.json and metrics.jsonl — never the other way round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_metric_per_round(metrics: list[dict[str, Any]], *, metric: str, path: Path) -> bool:
    evaluations = [record for record in metrics if record["phase"] == "evaluate"]
    if not evaluations:
        return False
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    rounds = [record["round"] for record in evaluations]
    sites = sorted({site for record in evaluations for site in record["sites"]})
    for site in sites:
        values = [record["sites"].get(site, {}).get(metric) for record in evaluations]
        axes.plot(rounds, [v if v is not None else float("nan") for v in values], marker="o", alpha=0.6, label=site)
    pooled = [record["pooled"].get(metric, float("nan")) for record in evaluations]
    axes.plot(rounds, pooled, marker="s", linewidth=2.5, color="black", label="all sites (pooled)")
    axes.set_xlabel("round")
    axes.set_ylabel(metric)
    axes.set_title(f"Federated {metric} per round")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"
    return "—" if value is None else str(value)


def render_report(summary: dict[str, Any], metrics: list[dict[str, Any]], run_path: Path) -> str:
    metric = summary.get("primary_metric", "accuracy")
    plot_name = f"{metric}_per_round.png"
    has_plot = plot_metric_per_round(metrics, metric=metric, path=run_path / plot_name)
    lines = [
        f"# medtwin run `{summary['run_id']}`",
        "",
        f"Task **{summary['task']}**, strategy **{summary.get('strategy', '?')}**, "
        f"{summary['rounds_completed']} round(s) over {len(summary['sites'])} site(s): {', '.join(summary['sites'])}.",
        f"Wall time {summary.get('wall_time_s', 0.0):.1f} s.",
        "",
        "## Federated model, evaluated at each site on its own test split",
        "",
        f"| site | {metric} | test rows |",
        "|---|---|---|",
    ]
    final = summary["final_metrics"]
    for site, values in final.get("sites", {}).items():
        lines.append(f"| {site} | {_fmt(values.get(metric))} | {_fmt(int(values.get('n', 0)))} |")
    pooled = final.get("pooled", {})
    lines.append(f"| **all sites (pooled)** | **{_fmt(pooled.get(metric))}** | {_fmt(int(pooled.get('n', 0)))} |")
    if has_plot:
        lines += ["", f"![{metric} per round]({plot_name})"]
    baselines = summary.get("baselines")
    if baselines:
        lines += ["", "## Baselines (same protocol, same test splits)", ""]
        lines += _baseline_table(baselines, metric)
    lines += ["", "## Privacy", "", summary.get("privacy_text", "No differential privacy in this run.")]
    if summary.get("privacy"):
        lines += ["", "| site | ε spent (this run) | δ |", "|---|---|---|"]
        lines += [f"| {site} | {v['epsilon']:.3f} | {v['delta']:.0e} |" for site, v in sorted(summary["privacy"].items())]
    crypto = summary["crypto"]
    lines += [
        "",
        "## Aggregation",
        "",
        f"Scheme **{crypto['scheme']}**; {_fmt(crypto.get('bytes_per_parameter'))} bytes per parameter on the wire "
        f"({_fmt(crypto.get('wire_expansion_vs_float32'))}x float32); max decryption error (relative to the largest "
        f"weight) {_fmt(crypto.get('max_decryption_error'))}, bound {_fmt(crypto.get('max_decryption_error_bound'))}.",
    ]
    rejections = summary.get("rejections", [])
    if rejections:
        lines += ["", "## Rejected updates", "", "| round | site | reason |", "|---|---|---|"]
        lines += [f"| {r['round']} | {r['site']} | {r['reason']} |" for r in rejections]
    chain = summary["chain"]
    lines += ["", "## Provenance", "", f"Chain backend: **{chain.get('backend', 'none')}**."]
    if chain.get("backend", "none") != "none":
        ids = chain.get("chain_ids", {})
        lines += [
            f"Authorization chain id {ids.get('auth')} (contract `{chain.get('contracts', {}).get('auth')}`), "
            f"data chain id {ids.get('data')} (contract `{chain.get('contracts', {}).get('data')}`); "
            f"{chain.get('anchors_written', 0)} round anchor(s) on the data chain, "
            f"{chain.get('writes_pending_in_outbox', 0)} write(s) still queued. "
            f"Check it yourself: `medtwin audit verify {summary['run_id']}`."
        ]
    return "\n".join(lines) + "\n"


def ordered_rows(rows: dict[str, Any]) -> list[tuple[str, Any]]:
    """Baseline rows in reading order: each site alone, pooled, then federated."""
    rank = {"pooled": 1, "federated": 2}
    return sorted(rows.items(), key=lambda item: (rank.get(item[0], 0), item[0]))


def _baseline_table(baselines: dict[str, Any], metric: str) -> list[str]:
    columns = baselines["columns"]
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in ordered_rows(baselines["rows"]):
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(column)) for column in columns) + " |")
    lines += [
        "",
        f"Each cell is {metric}. Site columns use each site's own normalisation; "
        "`pooled_test` is the union of test splits under pooled-train normalisation (FLamby's pooled test set); "
        "`mean_of_sites` is the plain mean of the site columns.",
    ]
    return lines
