"""report.md renders what sites sent as inert text: no table breaks, no beacons, no markup."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtwin.core.report import MAX_REASON_CHARACTERS, markdown_text, render_report

markdown_it = pytest.importorskip("markdown_it")

HOSTILE_REASON = (
    "| 1 | alpha | bad_signature: alpha forged its update | \n"
    "![x](https://evil.example/t.png) <img src=https://evil.example/p> [click](https://evil.example) **bold** `code`"
)
HOSTILE_SITE = "beta<img src=https://evil.example/s>|x"
HOSTILE_METRIC = "acc](https://evil.example/m.png)<img src=y>"


def _summary(**change: object) -> dict:
    summary = {
        "run_id": "run-1",
        "task": "fed_heart_disease",
        "strategy": "fedavg",
        "rounds_completed": 1,
        "sites": ["alpha", HOSTILE_SITE],
        "primary_metric": "accuracy",
        "final_metrics": {"sites": {"alpha": {"accuracy": 0.75, "n": 10}, HOSTILE_SITE: {"accuracy": 0.5, "n": 5}},
                          "pooled": {"accuracy": 0.7, "n": 15}},
        "privacy": {HOSTILE_SITE: {"epsilon": 0.5, "delta": 1e-5}},
        "crypto": {"scheme": "plain"},
        "rejections": [{"round": 1, "site": HOSTILE_SITE, "code": "bad_signature", "reason": HOSTILE_REASON}],
        "chain": {"backend": "none"},
    }  # fmt: skip
    return {**summary, **change}


def _html(markdown: str) -> str:
    return markdown_it.MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).render(markdown)


def _rejection_rows(markdown: str) -> list[str]:
    section = markdown[markdown.index("## Rejected updates") : markdown.index("## Provenance")]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| round")]


def test_a_refusal_reason_cannot_break_the_table_or_fetch_a_beacon(tmp_path: Path) -> None:
    markdown = render_report(_summary(), [], tmp_path)
    rows = _rejection_rows(markdown)
    assert len(rows) == 1  # the reason's newline did not start a row of its own
    html = _html(markdown)
    rejected = html[html.index("Rejected updates") :]
    table = rejected[: rejected.index("</table>")]
    assert table.count("<td>") == 3  # round, site, reason: the reason's `|` made no cells
    assert "<img" not in html and "<a " not in html and "<strong>bold" not in html and "<code>code" not in html
    assert "https://evil.example/t.png" in rejected  # still readable, as text


def test_site_ids_and_metric_names_are_inert_everywhere(tmp_path: Path) -> None:
    markdown = render_report(_summary(primary_metric=HOSTILE_METRIC), [], tmp_path)
    assert "<img" not in markdown and "](" not in markdown.replace("\\](", "")
    html = _html(markdown)
    assert "<img" not in html and "<a " not in html
    assert "beta&lt;img" in html  # shown, not rendered


def test_a_hostile_metric_name_cannot_choose_the_plot_path(tmp_path: Path) -> None:
    metrics = [{"phase": "evaluate", "round": 1, "sites": {"alpha": {"../../x": 0.5}}, "pooled": {"../../x": 0.5}}]
    (tmp_path / "run").mkdir()
    markdown = render_report(_summary(primary_metric="../../x"), metrics, tmp_path / "run")
    assert [path.parent for path in tmp_path.rglob("*.png")] == [tmp_path / "run"]
    assert "](______x_per_round.png)" in markdown


def test_a_long_reason_is_bounded(tmp_path: Path) -> None:
    rejection = {"round": 1, "site": "beta", "code": "x", "reason": "A" * 100_000}
    markdown = render_report(_summary(rejections=[rejection]), [], tmp_path)
    (row,) = _rejection_rows(markdown)
    assert len(row) < MAX_REASON_CHARACTERS + 50


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a|b", "a\\|b"),
        ("![x](u)", "!\\[x\\](u)"),
        ("<img src=x>", "&lt;img src=x&gt;"),
        ("a\nb\r\tc", "a b  c"),
        ("\\|", "\\\\\\|"),
        ("site_a", "site_a"),  # intraword `_` never makes emphasis: left readable
        ("_a_", "\\_a\\_"),
        ("*a* ~b~ `c` $d$ &e", "\\*a\\* \\~b\\~ \\`c\\` \\$d\\$ &amp;e"),
    ],
)
def test_markdown_text_escapes_markdown_and_html(raw: str, shown: str) -> None:
    assert markdown_text(raw) == shown


def test_the_report_names_a_weighted_mean_of_site_aurocs_for_what_it_is(tmp_path: Path) -> None:
    sites = {
        "alpha": {"accuracy": 0.75, "auroc": 0.8, "brier": 0.2, "sensitivity": 0.6, "n": 10},
        HOSTILE_SITE: {"accuracy": 0.5, "auroc": 0.7, "brier": 0.3, "sensitivity": 0.5, "n": 5},
    }
    pooled = {"accuracy": 0.6667, "brier": 0.2333, "row_weighted_site_mean_auroc": 0.7667,
              "row_weighted_site_mean_sensitivity": 0.5667, "n": 15}  # fmt: skip
    markdown = render_report(_summary(final_metrics={"sites": sites, "pooled": pooled}, decision_threshold=0.3), [], tmp_path)
    assert "| site | accuracy | auroc | brier | sensitivity |" in markdown
    assert "| **all sites (pooled)** | 0.6667 | 0.7667 † | 0.2333 | 0.5667 † |" in markdown
    assert "`row_weighted_site_mean_<metric>` in summary.json" in markdown
    assert "score >= 0.3000" in markdown
    _html(markdown)  # still one well-formed table with the hostile site id in it
