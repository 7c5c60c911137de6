"""Pooled AUROC, AUPRC and ECE from the sites' per-class score histograms, against scikit-learn on the
union of the sites' scores; what a site releases under each policy; what the coordinator refuses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medtwin.client.release import release_score_histogram
from medtwin.client.site_file import EvaluationPolicy
from medtwin.core.pooled_metrics import histogram_pooled_metrics
from medtwin.core.protocol import evaluation_sha256, metrics_sha256
from medtwin.core.reliability_plot import RELIABILITY_PLOT, plot_reliability
from medtwin.core.report import render_report
from medtwin.core.score_histogram import SCORE_HISTOGRAM_BINS, ScoreHistogram, ScoreHistogramError, pool_histograms
from medtwin.core.tasks.metrics import expected_calibration_error


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


def _sites(kind: str, seed: int, num_sites: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """(labels, scores) of each site, drawn the way `kind` says."""
    rng = np.random.default_rng(seed)
    sites = []
    for site in range(num_sites):
        rows = int(rng.integers(40, 600))
        labels = (rng.random(rows) < (0.03 if kind == "rare" else 0.35)).astype(np.float64)
        noise = rng.normal(size=rows)
        scores = {
            "uniform": rng.random(rows),  # no signal at all
            "informative": _sigmoid(noise + 1.5 * labels - 0.5 + 0.4 * site),
            # each site's scores live in its own range: site-mean AUROC and union AUROC differ
            "site_shifted": np.clip(0.08 * rng.random(rows) + 0.22 * site + 0.04 * labels, 0.0, 1.0),
            "squeezed": 0.05 * _sigmoid(noise + 1.5 * labels),  # a rare-event model: every score below 0.05
            "rare": _sigmoid(noise + 2.0 * labels - 3.0),
            "one_class_sites": _sigmoid(noise + site),  # overwritten labels below
        }[kind]
        if kind == "one_class_sites":
            labels = np.full(rows, float(site % 2))  # every site holds one class: no site has an AUROC
        sites.append((labels, scores))
    return sites


def _pooled(sites: list[tuple[np.ndarray, np.ndarray]]) -> tuple[ScoreHistogram, np.ndarray, np.ndarray]:
    histogram = pool_histograms(ScoreHistogram.of_scores(labels, scores) for labels, scores in sites)
    assert histogram is not None
    return histogram, np.concatenate([labels for labels, _ in sites]), np.concatenate([scores for _, scores in sites])


KINDS = ("uniform", "informative", "site_shifted", "squeezed", "rare", "one_class_sites")


@pytest.mark.parametrize("kind", KINDS)
def test_histogram_auroc_is_within_0_01_of_the_exact_auroc_on_the_union(kind: str) -> None:
    for seed in range(5):
        histogram, labels, scores = _pooled(_sites(kind, seed))
        exact = roc_auc_score(labels, scores)
        assert abs(histogram.auroc() - exact) <= 0.01, (kind, seed)
        assert abs(histogram.auroc() - exact) <= histogram.auroc_max_error() + 1e-12  # the reported bound holds
        assert histogram.rows == len(labels)


# stated tolerances: AUPRC ties a bin's rows (scikit-learn's average precision steps once per bin), so
# it moves more than AUROC when scores crowd into few bins; ECE is exact up to float rounding
AUPRC_TOLERANCE = {"squeezed": 0.03}


@pytest.mark.parametrize("kind", KINDS)
def test_histogram_auprc_and_ece_match_the_union_within_stated_tolerances(kind: str) -> None:
    for seed in range(5):
        histogram, labels, scores = _pooled(_sites(kind, seed))
        assert abs(histogram.auprc() - average_precision_score(labels, scores)) <= AUPRC_TOLERANCE.get(kind, 0.01), (kind, seed)
        assert histogram.ece() == pytest.approx(expected_calibration_error(labels, scores), abs=1e-9)


def test_the_union_figure_is_not_the_site_mean() -> None:
    """Why histograms: sites whose scores live in different ranges rank well together, not each alone."""
    sites = _sites("site_shifted", seed=0)
    histogram, labels, scores = _pooled(sites)
    site_mean = np.average([roc_auc_score(y, s) for y, s in sites], weights=[len(y) for y, _ in sites])
    assert abs(roc_auc_score(labels, scores) - site_mean) > 0.05
    assert histogram.auroc() == pytest.approx(roc_auc_score(labels, scores), abs=0.01)


def test_figures_of_one_site_equal_scikit_learn_on_binned_scores() -> None:
    labels, scores = _sites("informative", seed=3)[0]
    histogram = ScoreHistogram.of_scores(labels, scores)
    bins = np.searchsorted(np.linspace(0, 1, SCORE_HISTOGRAM_BINS + 1)[1:-1], scores)
    assert histogram.auroc() == pytest.approx(roc_auc_score(labels, bins), abs=1e-12)
    assert histogram.auprc() == pytest.approx(average_precision_score(labels, bins), abs=1e-12)


def test_pooled_figures_are_named_and_undefined_ones_left_out() -> None:
    histogram, labels, _ = _pooled(_sites("informative", seed=1))
    figures, pooled = histogram_pooled_metrics({"a": histogram})
    assert pooled == histogram
    assert set(figures) == {f"histogram_pooled_{name}" for name in ("auroc", "auroc_max_error", "auprc", "ece", "n")}
    assert figures["histogram_pooled_n"] == len(labels)
    one_class = ScoreHistogram.of_scores(np.zeros(5), np.full(5, 0.3))
    figures, _ = histogram_pooled_metrics({"a": one_class})
    assert "histogram_pooled_auroc" not in figures and figures["histogram_pooled_ece"] == pytest.approx(0.3)
    assert histogram_pooled_metrics({}) == ({}, None)


# --- what the coordinator refuses ------------------------------------------------------------------------


def _honest_values() -> tuple[dict, int]:
    labels, scores = _sites("informative", seed=2)[0]
    return ScoreHistogram.of_scores(labels, scores).to_values(), len(labels)


def _tampered(change) -> tuple[dict, int]:
    values, rows = _honest_values()
    values = {name: list(column) for name, column in values.items()}
    change(values, rows)
    return values, rows


HOSTILE = {
    "too-short": (lambda v, n: v.update(negatives=v["negatives"][:-1]), "negatives must be 1000 values"),
    "too-long": (lambda v, n: v.update(score_sums=v["score_sums"] + [0.0]), "score_sums must be 1000 values"),
    "missing-field": (lambda v, n: v.pop("positives"), "positives must be 1000 values (got NoneType)"),
    "not-a-list": (lambda v, n: v.update(positives=7), "positives must be 1000 values (got int)"),
    "unknown-field": (lambda v, n: v.update(patient_ids=[1, 2]), "unknown field"),
    "negative-count": (lambda v, n: v["negatives"].__setitem__(0, -3), "non-negative integers"),
    "fractional-count": (lambda v, n: v["positives"].__setitem__(5, 0.5), "non-negative integers"),
    "bool-count": (lambda v, n: v["positives"].__setitem__(5, True), "non-negative integers"),
    "nan-sum": (lambda v, n: v["score_sums"].__setitem__(3, math.nan), "finite"),
    "inf-sum": (lambda v, n: v["score_sums"].__setitem__(3, math.inf), "finite"),
    "counts-past-n": (lambda v, n: v["negatives"].__setitem__(0, v["negatives"][0] + 1), "but the site released n="),
    "sum-outside-its-bin": (lambda v, n: v["score_sums"].__setitem__(0, 5.0), "outside what its rows' scores allow"),
    "huge-count": (lambda v, n: v["negatives"].__setitem__(0, 2**62), "but the site released n="),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_histogram_is_refused_with_its_problem(case: str) -> None:
    change, problem = HOSTILE[case]
    values, rows = _tampered(change)
    with pytest.raises(ScoreHistogramError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        ScoreHistogram.checked(values, rows=float(rows))


def test_every_problem_is_named_at_once_and_an_honest_histogram_passes() -> None:
    values, rows = _honest_values()
    assert ScoreHistogram.checked(values, rows=float(rows)).to_values() == values
    with pytest.raises(ScoreHistogramError) as raised:
        ScoreHistogram.checked({**values, "negatives": [-1] * SCORE_HISTOGRAM_BINS, "score_sums": [math.nan]}, rows=rows)
    assert len(raised.value.problems) == 2
    with pytest.raises(ScoreHistogramError, match="released n="):
        ScoreHistogram.checked(values, rows=math.nan)


# --- what a site releases, and what it signs -------------------------------------------------------------


def test_exact_and_rounded_release_the_histogram_and_dp_withholds_it() -> None:
    labels, scores = _sites("informative", seed=4)[0]
    histogram = ScoreHistogram.of_scores(labels, scores)
    assert release_score_histogram(histogram, EvaluationPolicy(release="exact")) is None  # off unless the site file opts in
    assert release_score_histogram(histogram, EvaluationPolicy(release="rounded")) is None
    assert release_score_histogram(histogram, EvaluationPolicy(release="exact", score_histogram=True)) == histogram
    rounded = release_score_histogram(histogram, EvaluationPolicy(release="rounded", decimals=2, score_histogram=True))
    assert rounded is not None and rounded.negatives == histogram.negatives and rounded.positives == histogram.positives
    assert rounded.score_sums == tuple(round(total, 2) for total in histogram.score_sums) != histogram.score_sums
    ScoreHistogram.checked(rounded.to_values(), rows=float(len(labels)))  # the coordinator still accepts it
    assert release_score_histogram(histogram, EvaluationPolicy(release="dp", epsilon_per_release=1.0)) is None
    assert release_score_histogram(None, EvaluationPolicy(release="exact")) is None  # a regression task has none


def test_the_signed_digest_covers_the_histogram() -> None:
    metrics = {"accuracy": 0.8, "n": 3.0}
    values = ScoreHistogram.of_scores(np.array([0, 1, 1]), np.array([0.2, 0.7, 0.9])).to_values()
    assert evaluation_sha256(metrics) == metrics_sha256(metrics)  # no histogram: signed as before
    signed = evaluation_sha256(metrics, values)
    assert signed != metrics_sha256(metrics)
    moved = {**values, "positives": list(values["positives"])}
    highest = max(index for index, count in enumerate(values["positives"]) if count)
    moved["positives"][highest], moved["positives"][999] = 0, 1  # the 0.9 patient now scored 1.0
    assert evaluation_sha256(metrics, moved) != signed


# --- the reliability plot -------------------------------------------------------------------------------


def test_the_report_draws_the_reliability_plot_and_names_the_figures(tmp_path: Path) -> None:
    histogram, labels, _ = _pooled(_sites("informative", seed=5))
    figures, _ = histogram_pooled_metrics({"a": histogram})
    summary = {
        "run_id": "run-1", "task": "fed_heart_disease", "strategy": "fedavg", "rounds_completed": 1, "sites": ["a"],
        "primary_metric": "accuracy", "crypto": {"scheme": "plain"}, "chain": {"backend": "none"},
        "final_metrics": {
            "sites": {"a": {"accuracy": 0.7, "auroc": 0.8, "n": float(len(labels))}},
            "pooled": {"accuracy": 0.7, "row_weighted_site_mean_auroc": 0.8, "n": float(len(labels))} | figures,
            "pooled_score_histogram": histogram.to_values(),
        },
    }  # fmt: skip
    markdown = render_report(summary, [], tmp_path)
    plot = tmp_path / RELIABILITY_PLOT
    assert plot.read_bytes().startswith(b"\x89PNG") and plot.stat().st_size > 5000
    assert f"]({RELIABILITY_PLOT})" in markdown
    assert f"| auroc | {figures['histogram_pooled_auroc']:.4f} | `histogram_pooled_auroc` |" in markdown
    summary["final_metrics"]["pooled_score_histogram"] = {"negatives": "junk"}  # a damaged summary: no plot, no crash
    plot.unlink()
    assert RELIABILITY_PLOT not in render_report(summary, [], tmp_path) and not plot.exists()


def test_reliability_plot_file_is_a_non_empty_png(tmp_path: Path) -> None:
    histogram, _, _ = _pooled(_sites("rare", seed=0))
    plot_reliability(histogram, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "r.png").stat().st_size > 5000


def test_a_checkpoint_keeps_the_pooled_histogram_for_the_resumed_run(tmp_path: Path) -> None:
    from medtwin.core.protocol import RoundCertificate
    from medtwin.server.checkpoint import RoundCheckpoint, load_checkpoint, save_checkpoint

    histogram, _, _ = _pooled(_sites("informative", seed=6))
    checkpoint = RoundCheckpoint(
        run_id="run-1", config_sha256="0" * 64, server_round=1, phase="evaluate", aggregate_sha256="1" * 64,
        certificate=RoundCertificate(server_round=1, aggregate_sha256="1" * 64, claims=()), aggregate_digests=("1" * 64,),
        final_score_histogram=histogram.to_values(),
    )  # fmt: skip
    restored = load_checkpoint(save_checkpoint(tmp_path, checkpoint))
    assert ScoreHistogram(**restored.final_score_histogram) == histogram
    without = load_checkpoint(save_checkpoint(tmp_path / "old", RoundCheckpoint(**{**vars(checkpoint), "final_score_histogram": None})))
    assert without.final_score_histogram is None


def test_the_histogram_record_crosses_flowers_wire_format_unchanged() -> None:
    """Deployment serialises a reply's RecordDict to protobuf (simulation passes it in memory): the
    histogram must come back with the same ints and floats, so the signed digest still matches."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    from medtwin.core.protocol import METRICS, SCORE_HISTOGRAM

    labels, scores = _sites("informative", seed=7)[0]
    metrics = {"accuracy": 0.75, "n": float(len(labels))}
    values = ScoreHistogram.of_scores(labels, scores).to_values()
    sent = RecordDict({METRICS: MetricRecord(metrics), SCORE_HISTOGRAM: MetricRecord(values)})
    received = recorddict_from_proto(recorddict_to_proto(sent))
    histogram = dict(received[SCORE_HISTOGRAM].items())
    assert histogram == values and all(type(count) is int for count in histogram["negatives"])
    assert evaluation_sha256(dict(received[METRICS].items()), histogram) == evaluation_sha256(metrics, values)


def test_a_site_moves_the_pooled_ece_no_further_than_its_own_rows_allow() -> None:
    """A bin's score sum may be off its rows' range by rounding (the slack `checked` allows), but what
    is pooled is clipped to that range: 10 rows with phantom score mass in the 990 bins they do not
    fill (+0.5 or -0.5 each, inside the slack) must not move the ECE of 1010 rows by more than 10 rows can."""
    rng = np.random.default_rng(0)
    scores = rng.random(1000)
    honest = ScoreHistogram.of_scores((rng.random(1000) < scores).astype(float), scores)
    values = ScoreHistogram.of_scores(np.zeros(10), np.full(10, 0.1005)).to_values()
    positives_per_group = np.asarray(honest.positives).reshape(10, -1).sum(axis=1)
    sums_per_group = np.asarray(honest.score_sums).reshape(10, -1).sum(axis=1)
    away = np.sign(sums_per_group - positives_per_group)  # push every ECE bin's gap wider
    for index in range(SCORE_HISTOGRAM_BINS):
        if values["negatives"][index] + values["positives"][index] == 0:
            values["score_sums"][index] = 0.5 * (away[index // 100] or 1.0)
    hostile = ScoreHistogram.checked(values, rows=10.0)
    assert all(total == 0.0 for total, rows in zip(hostile.score_sums, hostile.negatives, strict=True) if rows == 0)
    pooled = pool_histograms([honest, hostile])
    assert abs(pooled.ece() - honest.ece()) <= 10 / 1010 + 1e-12
    mean_score, _, _ = pooled.reliability()
    assert np.all((mean_score >= 0.0) & (mean_score <= 1.0))


def test_a_rounded_score_sum_is_pulled_back_into_its_bin() -> None:
    """decimals: 0 rounds a bin of one row scored 0.5005 to 1.0 — accepted (rounding), counted as 0.501."""
    values = ScoreHistogram.of_scores(np.array([1.0]), np.array([0.5005])).rounded(0).to_values()
    assert max(values["score_sums"]) == 1.0
    checked = ScoreHistogram.checked(values, rows=1.0)
    assert max(checked.score_sums) == pytest.approx(0.501)


def test_a_site_file_opts_in_to_the_histogram_and_never_under_dp(tmp_path) -> None:
    """Row-level score counts leave a site only if its own file says so (default off), never with release: dp."""
    import yaml

    from medtwin.client.site_file import SiteFileError, load_site_file

    def site_file(evaluation: dict):
        path = tmp_path / "site.yaml"
        path.write_text(yaml.safe_dump({
            "site_id": "cleveland", "data": {"builtin": {"task": "fed_heart_disease", "index": 0}},
            "privacy": {"max_epsilon": 3.0, "max_delta": 1e-4}, "evaluation": evaluation,
            "kit_dir": str(tmp_path / "kit"), "state_dir": str(tmp_path / "state"),
        }))  # fmt: skip
        return load_site_file(path)

    assert site_file({"release": "exact"}).evaluation.score_histogram is False
    assert site_file({"release": "rounded", "score_histogram": True}).evaluation.score_histogram is True
    with pytest.raises(SiteFileError, match="score_histogram"):
        site_file({"release": "dp", "score_histogram": True})
