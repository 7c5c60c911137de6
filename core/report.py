"""Render report.md (and its PNG plots) from summary.json and metrics.jsonl — never the other way round.

Site ids, refusal reasons and metric names come from sites (a refusal reason is whatever text a
site signed): each is rendered as inert text with `markdown_text` — Markdown and HTML escaped, line
breaks flattened, length bounded — so it can neither break a table (`|`), nor fetch a beacon
(`![x](https://…)`, `<img src=…>`), nor restyle the report.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .pooled_metrics import HISTOGRAM_POOLED_PREFIX, SITE_LEVEL_METRICS, WEIGHTED_SITE_MEAN_PREFIX, pooled_name  # noqa: E402
from .reliability_plot import RELIABILITY_PLOT, histogram_from_summary, plot_reliability  # noqa: E402
from .score_histogram import SCORE_HISTOGRAM_BINS  # noqa: E402

_MARKDOWN_SPECIAL = frozenset("\\`*[]|~$")  # always escaped; `_` only where it could start or end emphasis
_HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
MAX_REASON_CHARACTERS = 300
# the metrics tasks compute (core/tasks/metrics.py), in reading order; only these get the clinical table
CLINICAL_METRICS = ("accuracy", "auroc", "auprc", "brier", "ece", "sensitivity", "specificity", "mse", "rmse", "mae", "r2")


def markdown_text(value: object, *, max_characters: int | None = None) -> str:
    """`value` as inert Markdown text for a table cell or a sentence: nothing in it renders as markup."""
    text = str(value)
    if max_characters is not None and len(text) > max_characters:
        text = text[:max_characters] + "…"
    out = []
    for position, character in enumerate(text):
        if not character.isprintable():
            out.append(" ")  # newlines, tabs, other controls: a cell stays one line
        elif character in _HTML_ENTITIES:
            out.append(_HTML_ENTITIES[character])
        elif character in _MARKDOWN_SPECIAL:
            out.append("\\" + character)
        elif character == "_" and not _intraword(text, position):
            out.append("\\_")
        else:
            out.append(character)
    return "".join(out)


def _code(value: object) -> str:
    """`value` as a code span when it is a plain id (nothing to escape inside backticks), else as inert text."""
    text = str(value)
    return f"`{text}`" if _is_plain_id(text) else markdown_text(text, max_characters=128)


def _is_plain_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", text) is not None


def _intraword(text: str, position: int) -> bool:
    """True if text[position] sits between two letters/digits (where `_` never opens or closes emphasis)."""
    return 0 < position < len(text) - 1 and text[position - 1].isalnum() and text[position + 1].isalnum()


def _plot_file_name(metric: str) -> str:
    """A file name for the metric's plot: only letters, digits, '_', '-', whatever the metric is called."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(metric))[:64] + "_per_round.png"


def plot_metric_per_round(metrics: list[dict[str, Any]], *, metric: str, path: Path) -> bool:
    evaluations = [record for record in metrics if record["phase"] == "evaluate"]
    if not evaluations:
        return False
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    rounds = [record["round"] for record in evaluations]
    sites = sorted({site for record in evaluations for site in record["sites"]})
    for site in sites:
        values = [record["sites"].get(site, {}).get(metric) for record in evaluations]
        axes.plot(rounds, [v if v is not None else float("nan") for v in values], marker="o", alpha=0.6, label=_plain(site))
    pooled = [record["pooled"].get(metric, float("nan")) for record in evaluations]
    axes.plot(rounds, pooled, marker="s", linewidth=2.5, color="black", label="all sites (pooled)")
    axes.set_xlabel("round")
    axes.set_ylabel(_plain(metric))
    axes.set_title(f"Federated {_plain(metric)} per round")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _plain(value: object) -> str:
    """A label for matplotlib: bounded, and `$` escaped so it is not read as mathtext."""
    return str(value)[:64].replace("$", r"\$")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"
    return "—" if value is None else markdown_text(value, max_characters=64)


def render_report(summary: dict[str, Any], metrics: list[dict[str, Any]], run_path: Path) -> str:
    metric = summary.get("primary_metric", "accuracy")
    shown_metric = markdown_text(metric, max_characters=64)
    plot_name = _plot_file_name(metric)
    has_plot = plot_metric_per_round(metrics, metric=metric, path=run_path / plot_name)
    sites = ", ".join(markdown_text(site, max_characters=128) for site in summary["sites"])
    run_id = str(summary["run_id"])
    lines = [
        f"# medtwin run {_code(summary['run_id'])}",
        "",
        f"Task **{markdown_text(summary['task'])}**, strategy **{markdown_text(summary.get('strategy', '?'))}**, "
        f"{summary['rounds_completed']} round(s) over {len(summary['sites'])} site(s): {sites}.",
        f"Wall time {summary.get('wall_time_s', 0.0):.1f} s.",
        *(
            [f"**The run stopped early** — {markdown_text(summary['stopped'], max_characters=500)}. "
             f"Continue it with `medtwin run … --resume {run_id if _is_plain_id(run_id) else '<run id>'}`."]
            if summary.get("stopped") else []
        ),  # fmt: skip
        "",
        "## Federated model, evaluated at each site on its own test split",
        "",
        f"| site | {shown_metric} | test rows |",
        "|---|---|---|",
    ]
    final = summary["final_metrics"]
    for site, values in final.get("sites", {}).items():
        shown_site = markdown_text(site, max_characters=128)
        lines.append(f"| {shown_site} | {_fmt(values.get(metric))} | {_fmt(int(values.get('n', 0)))} |")
    pooled = final.get("pooled", {})
    lines.append(f"| **all sites (pooled)** | **{_fmt(pooled.get(pooled_name(metric)))}** | {_fmt(int(pooled.get('n', 0)))} |")
    if has_plot:
        lines += ["", f"![{shown_metric} per round]({plot_name})"]
    lines += _clinical_table(final, threshold=summary.get("decision_threshold", 0.5))
    lines += _histogram_section(final, run_path)
    baselines = summary.get("baselines")
    if baselines:
        lines += ["", "## Baselines (same protocol, same test splits)", ""]
        lines += _baseline_table(baselines, metric)
    lines += _twin_section(summary.get("twin"))
    lines += ["", "## Privacy", "", summary.get("privacy_text", "No differential privacy in this run.")]
    if summary.get("privacy"):
        lines += ["", "| site | ε spent (this run) | δ |", "|---|---|---|"]
        lines += [
            f"| {markdown_text(site, max_characters=128)} | {v['epsilon']:.3f} | {v['delta']:.0e} |"
            for site, v in sorted(summary["privacy"].items())
        ]
    crypto = summary["crypto"]
    lines += [
        "",
        "## Aggregation",
        "",
        f"Scheme **{markdown_text(crypto['scheme'])}**; {_fmt(crypto.get('bytes_per_parameter'))} bytes per parameter "
        "on the wire "
        f"({_fmt(crypto.get('wire_expansion_vs_float32'))}x float32); max decryption error (relative to the largest "
        f"weight) {_fmt(crypto.get('max_decryption_error'))}, bound {_fmt(crypto.get('max_decryption_error_bound'))}.",
    ]
    rejections = summary.get("rejections", [])
    if rejections:
        lines += ["", "## Rejected updates", "", "| round | site | reason |", "|---|---|---|"]
        lines += [
            f"| {_fmt(r['round'])} | {markdown_text(r['site'], max_characters=128)} | "
            f"{markdown_text(r['reason'], max_characters=MAX_REASON_CHARACTERS)} |"
            for r in rejections
        ]
    chain = summary["chain"]
    lines += ["", "## Provenance", ""]
    if "error" in chain:
        lines += [f"**Recording the end of the run on the chains failed**: {markdown_text(chain['error'], max_characters=500)}"]
        return "\n".join(lines) + "\n"
    lines += [f"Chain backend: **{markdown_text(chain.get('backend', 'none'))}**."]
    if chain.get("writes_pending_in_outbox"):
        queued = ", ".join(f"{role}: {len(methods)}" for role, methods in chain.get("queued", {}).items() if methods)
        lines += [
            f"**{chain['writes_pending_in_outbox']} chain write(s) are queued, not yet on chain** ({markdown_text(queued)}); "
            "they are sent in order by `medtwin chain flush` or the next `medtwin chain up`"
            + (f" (unreachable: {markdown_text(chain['unreachable'], max_characters=200)})" if chain.get("unreachable") else "")
            + "."
        ]
    if chain.get("backend", "none") != "none":
        ids = chain.get("chain_ids", {})
        finality = {
            None: "",
            True: " Every write is finalized (durable on its chain).",
            False: " **Not every write is finalized yet**: a node could still lose it; `medtwin chain flush` sends again what a node lost.",
        }[chain.get("finalized")]
        lines += [
            f"Authorization chain id {_fmt(ids.get('auth'))} (contract {_code(chain.get('contracts', {}).get('auth'))}), "
            f"data chain id {_fmt(ids.get('data'))} (contract {_code(chain.get('contracts', {}).get('data'))}); "
            f"{_fmt(chain.get('anchors_written')) if chain.get('anchors_written') is not None else 'unknown (unreachable)'} "
            "round anchor(s) on the data chain, "
            f"{chain.get('writes_pending_in_outbox', 0)} write(s) still queued.{finality} "
            f"Check it yourself: `medtwin audit verify {run_id if _is_plain_id(run_id) else '<run id>'}`."
        ]
    return "\n".join(lines) + "\n"


def _clinical_table(final: dict[str, Any], *, threshold: float) -> list[str]:
    """Every clinical metric the sites released, per site, and each one's pooled figure named for what it is."""
    site_values = final.get("sites", {})
    pooled = final.get("pooled", {})
    shown = [name for name in CLINICAL_METRICS if any(name in values for values in site_values.values())]
    if len(shown) < 2:
        return []
    lines = ["", "## All metrics of the federated model", "", f"| site | {' | '.join(shown)} |", "|---|" + "---|" * len(shown)]
    for site, values in site_values.items():
        lines.append(f"| {markdown_text(site, max_characters=128)} | {' | '.join(_fmt(values.get(name)) for name in shown)} |")
    pooled_cells = [
        _fmt(pooled.get(pooled_name(name))) + (" †" if name in SITE_LEVEL_METRICS and pooled_name(name) in pooled else "")
        for name in shown
    ]
    lines.append(f"| **all sites (pooled)** | {' | '.join(pooled_cells)} |")
    notes = []
    if any(name in SITE_LEVEL_METRICS for name in shown):
        notes.append(
            "† not the metric on the union of the test sets (sites never share patient-level scores): the "
            f"test-row-weighted mean of the site values, `{WEIGHTED_SITE_MEAN_PREFIX}<metric>` in summary.json. "
            "The other pooled cells are exact on the union (row means weighted by test rows; RMSE from the pooled MSE)."
            + (" AUROC, AUPRC and ECE on the union: next section." if HISTOGRAM_POOLED_PREFIX + "n" in pooled else "")
        )
    if "sensitivity" in shown or "specificity" in shown:
        notes.append(f"Sensitivity and specificity call a row positive at score >= {_fmt(float(threshold))} (`task.decision_threshold`).")
    if "ece" in shown:
        notes.append("ECE: 10 equal-width probability bins.")
    notes.append("A blank (—) is a metric a site withheld (its release policy) or that is undefined on its split.")
    return lines + ["", " ".join(notes)]


def _histogram_section(final: dict[str, Any], run_path: Path) -> list[str]:
    """AUROC, AUPRC and ECE on the union of the test sets, from the sites' summed score histograms, and
    the reliability diagram (written next to the report)."""
    pooled = final.get("pooled", {})
    covered = pooled.get(HISTOGRAM_POOLED_PREFIX + "n")
    if not isinstance(covered, int | float):
        return []
    max_error = pooled.get(HISTOGRAM_POOLED_PREFIX + "auroc_max_error")
    lines = [
        "",
        "## The federated model on all sites' test rows together",
        "",
        "| metric | all sites' test rows | name in summary.json |",
        "|---|---|---|",
    ]
    for name in ("auroc", "auprc", "ece"):
        key = HISTOGRAM_POOLED_PREFIX + name
        if key in pooled:
            lines.append(f"| {name} | {_fmt(pooled[key])} | `{key}` |")
    total = pooled.get("n")
    lines += [
        "",
        f"From the sites' per-class score histograms ({SCORE_HISTOGRAM_BINS} equal-width score bins, summed over "
        f"sites: each test row's label and score to the bin, not which patient it is) over {_fmt(int(covered))} of {_fmt(int(total)) if isinstance(total, int | float) else '?'} "
        "test rows (a site releasing under `dp` withholds its histogram)."
        + (f" The exact AUROC on these rows is within ±{_fmt(float(max_error))} of the figure (rows sharing a bin count as ties)."
           if isinstance(max_error, float) else "")
        + " ECE is exact (10 bins, per-bin score sums).",
    ]  # fmt: skip
    histogram = histogram_from_summary(final.get("pooled_score_histogram"))
    if histogram is not None:
        plot_reliability(histogram, run_path / RELIABILITY_PLOT)
        lines += ["", f"![reliability of the federated model on all sites' test rows]({RELIABILITY_PLOT})"]
    return lines


def ordered_rows(rows: dict[str, Any]) -> list[tuple[str, Any]]:
    """Baseline rows in reading order: each site alone, pooled, then federated."""
    rank = {"pooled": 1, "federated": 2}
    return sorted(rows.items(), key=lambda item: (rank.get(item[0], 0), item[0]))


def _twin_section(twin: dict[str, Any] | None) -> list[str]:
    """The vital-signs twin at one held-out patient's bedside (simulation: the harness holds the model)."""
    if not twin:
        return []
    onset = twin.get("onset_h")
    alerts = twin.get("alerts", [])
    first = ", ".join(markdown_text(name, max_characters=16) for name in alerts[0]["drivers"]) if alerts else ""
    news2 = twin.get("first_news2_5_h")
    return [
        "", "## The twin at one held-out patient's bedside", "",
        f"Patient {_code(twin.get('patient'))}: labelled onset {_fmt(onset) + ' h' if onset is not None else 'none'}; "
        f"{len(alerts)} twin alert(s)" + (f", the first at {_fmt(alerts[0]['start_h'])} h driven by {first}" if alerts else "")
        + f"; NEWS2 first reached 5 at {_fmt(news2) + ' h' if news2 is not None else 'no time'}.",
        "", f"![the twin's band, NEWS2 and alerts]({markdown_text(twin.get('plot', ''), max_characters=64)})",
    ]  # fmt: skip


def _baseline_table(baselines: dict[str, Any], metric: str) -> list[str]:
    columns = baselines["columns"]
    header = " | ".join(markdown_text(column, max_characters=128) for column in columns)
    lines = [f"| model | {header} |", "|---|" + "---|" * len(columns)]
    for name, row in ordered_rows(baselines["rows"]):
        cells = " | ".join(_fmt(row.get(column)) for column in columns)
        lines.append(f"| {markdown_text(name, max_characters=128)} | {cells} |")
    lines += [
        "",
        f"Each cell is {markdown_text(metric, max_characters=64)}. Site columns use each site's own normalisation; "
        "`pooled_test` is the union of test splits under pooled-train normalisation (FLamby's pooled test set); "
        "`mean_of_sites` is the plain mean of the site columns.",
    ]
    return lines + _pooled_test_metrics_table(baselines.get("pooled_test_metrics") or {})


def _pooled_test_metrics_table(models: dict[str, Any]) -> list[str]:
    """Every model's every metric on `pooled_test` (exact: the simulation harness holds all the rows)."""
    shown = [name for name in CLINICAL_METRICS if any(name in values for values in models.values())]
    if len(shown) < 2:
        return []
    lines = ["", "All metrics on `pooled_test`:", "", f"| model | {' | '.join(shown)} |", "|---|" + "---|" * len(shown)]
    for name, values in ordered_rows(models):
        lines.append(f"| {markdown_text(name, max_characters=128)} | {' | '.join(_fmt(values.get(metric)) for metric in shown)} |")
    return lines
