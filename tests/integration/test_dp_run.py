"""Differential privacy through whole simulated runs: per-site (epsilon, delta) in the run directory,
the site's own policy overriding the coordinator's request, and a budget that a restart never resets.

Each run is 2 rounds of Fed-Heart-Disease with real Opacus DP-SGD in Flower's simulation engine,
crypto=plain and no chain. Every run gets its own tmp folder, so the sites' ledgers
(<runs_dir parent>/.medtwin-sites/<site>/privacy-ledger.json) are the test's own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from medtwin.core.config import MedtwinConfig, compose_config

pytestmark = pytest.mark.slow

SITES = ["cleveland", "hungarian", "switzerland", "va"]
TARGET_EPSILON = 1.0
STRICT_SITE = "switzerland"
STRICT_MAX_EPSILON = 0.5
TRAINED = [site for site in SITES if site != STRICT_SITE]


@dataclass(frozen=True)
class Run:
    config: MedtwinConfig
    path: Path

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.path / "summary.json").read_text())

    def records(self, phase: str) -> list[dict[str, Any]]:
        lines = (self.path / "metrics.jsonl").read_text().splitlines()
        return [record for record in map(json.loads, lines) if record["phase"] == phase]


def dp_config(root: Path, *, run_id: str) -> MedtwinConfig:
    return compose_config(
        [
            "task=fed_heart_disease",
            "federation.num_rounds=2",
            "baselines.enabled=false",
            "progress=false",
            f"runs_dir={root / 'runs'}",
            "privacy=dp",
            f"privacy.target_epsilon={TARGET_EPSILON}",
            "crypto=plain",
            "chain=none",
            f"run_id={run_id}",
        ]
    )


def ledger(config: MedtwinConfig, site: str):
    from medtwin.client.privacy import BudgetLedger
    from medtwin.experiments.federation_setup import site_state_dir

    return BudgetLedger(site_state_dir(config, site) / "privacy-ledger.json", site)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One run serves every test: one hospital's site file allows less epsilon than the run requests (the
    harness writes each simulated hospital's site file from configs/sites/simulation.yaml; a tmp copy
    overrides one site), the other three train under DP."""
    from medtwin.experiments import simulated_sites
    from medtwin.experiments.simulate import simulate

    root = tmp_path_factory.mktemp("dp-run")
    settings_file = root / "simulated-sites.yaml"
    document = yaml.safe_load(simulated_sites.SIMULATED_SITES.read_text(encoding="utf-8"))
    document["sites"] = {STRICT_SITE: {"privacy": {"max_epsilon": STRICT_MAX_EPSILON}}}
    settings_file.write_text(yaml.safe_dump(document), encoding="utf-8")
    config = dp_config(root, run_id="dp-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(simulated_sites, "SIMULATED_SITES", settings_file)
        path = simulate(config)
    return Run(config=config, path=path)


# -- a DP run ------------------------------------------------------------------------------------


def test_summary_reports_epsilon_and_delta_per_site_within_the_target(dp_run: Run) -> None:
    summary = dp_run.summary
    privacy_config = dp_run.config.privacy
    assert summary["rounds_completed"] == 2 and {r["site"] for r in summary["rejections"]} == {STRICT_SITE}
    assert sorted(summary["privacy"]) == TRAINED
    ceiling = privacy_config.target_epsilon * (1 + privacy_config.epsilon_tolerance)
    for site, spent in summary["privacy"].items():
        assert set(spent) == {"epsilon", "delta"}, site
        assert 0 < spent["epsilon"] <= ceiling, (site, spent)
        assert spent["epsilon"] >= 0.9 * privacy_config.target_epsilon, (site, spent)  # calibrated, not just "small"
        assert spent["delta"] == privacy_config.target_delta
        assert ledger(dp_run.config, site).spent("dp-run") == pytest.approx(spent["epsilon"], rel=1e-12)


def test_report_has_the_privacy_paragraph(dp_run: Run) -> None:
    summary = dp_run.summary
    report = (dp_run.path / "report.md").read_text(encoding="utf-8")
    assert "## Privacy" in report
    assert summary["privacy_text"] in report
    assert "differential privacy" in summary["privacy_text"].lower()
    worst = max(spent["epsilon"] for spent in summary["privacy"].values())
    assert f"ε={worst:.2f}" in summary["privacy_text"]
    for site in TRAINED:
        assert re.search(rf"\|\s*{site}\s*\|\s*{summary['privacy'][site]['epsilon']:.3f}\s*\|", report), site


def test_metrics_carry_per_site_epsilon_that_grows_with_rounds(dp_run: Run) -> None:
    first, second = dp_run.records("train")
    for site in TRAINED:
        assert 0 < first["sites"][site]["epsilon"] < second["sites"][site]["epsilon"], site
        assert second["sites"][site]["epsilon"] == dp_run.summary["privacy"][site]["epsilon"]
        # one noise multiplier per site for the whole run, calibrated to its own sample rate
        # (recorded apart as the site's unsigned commentary: nothing unsigned is recorded as fact)
        assert first["sites"][site]["unsigned.noise_multiplier"] == second["sites"][site]["unsigned.noise_multiplier"] > 0
        assert not [key for key in first["sites"][site] if "train_loss" in key]  # the non-DP training loss stays at the site
        assert [spend.round for spend in ledger(dp_run.config, site).run("dp-run").rounds] == [1, 2]


# -- the site's policy wins ------------------------------------------------------------------------


def test_a_sites_policy_wins_over_the_requested_epsilon(dp_run: Run) -> None:
    summary = dp_run.summary
    others = TRAINED
    assert summary["rounds_completed"] == 2
    rejections = summary["rejections"]
    assert [(r["round"], r["site"]) for r in rejections] == [(1, STRICT_SITE), (2, STRICT_SITE)]
    for rejection in rejections:
        assert f"max_epsilon {STRICT_MAX_EPSILON}" in rejection["reason"], rejection
        assert f"requested epsilon {TARGET_EPSILON}" in rejection["reason"], rejection
    for record in dp_run.records("train"):
        assert record["participants"] == others
        assert STRICT_SITE in record["rejected"] and STRICT_SITE not in record["update_sha256"]
    assert sorted(summary["privacy"]) == others
    assert ledger(dp_run.config, STRICT_SITE).run("dp-run") is None  # refused before spending
    assert ledger(dp_run.config, STRICT_SITE).spent("dp-run") == 0.0
    assert ledger(dp_run.config, "va").spent("dp-run") > 0
    assert set(summary["final_metrics"]["sites"]) == set(SITES)  # it still evaluates the shared model


# -- restarts never reset the budget (last: it reuses dp_run's folders) ------------------------------


def test_the_same_run_id_again_is_refused_and_a_lost_run_folder_replays_without_spending(dp_run: Run) -> None:
    import shutil

    from medtwin.core.errors import ConfigError
    from medtwin.experiments.simulate import simulate

    ledgers_before = {site: ledger(dp_run.config, site) for site in TRAINED}
    spent_before = {site: book.spent("dp-run") for site, book in ledgers_before.items()}
    assert all(spent > 0 for spent in spent_before.values())

    from medtwin.experiments import simulated_sites

    root = Path(dp_run.config.runs_dir).parent
    again = dp_config(root, run_id="dp-run")  # same run id, same runs_dir
    with pytest.raises(ConfigError, match="run dp-run already exists"):  # the coordinator uses a run id once
        simulate(again)
    # a coordinator that lost (or deleted) its run folder runs it again: every site answers each round with
    # the update it signed the first time (same run, round and starting model) — nothing is trained or spent
    run_folder = Path(dp_run.config.runs_dir) / "dp-run"
    shutil.move(str(run_folder), str(run_folder.with_name("dp-run.kept")))
    with pytest.MonkeyPatch.context() as patch:  # the same hospitals, the strict one included
        patch.setattr(simulated_sites, "SIMULATED_SITES", root / "simulated-sites.yaml")
        path = simulate(again)
    first = json.loads((run_folder.with_name("dp-run.kept") / "summary.json").read_text())
    assert json.loads((path / "summary.json").read_text())["final_aggregate_sha256"] == first["final_aggregate_sha256"]

    for site in TRAINED:
        after = ledger(dp_run.config, site)
        assert after.spent("dp-run") >= spent_before[site], site
        assert after.spent("dp-run") == spent_before[site]  # nothing spent twice
        assert [spend.round for spend in after.run("dp-run").rounds] == [1, 2]
