"""`medtwin site approve`: the approver sees every field the site takes from a proposal, inertly, and the spend."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from medtwin.core.config import compose_config, config_to_yaml
from medtwin.core.identity import init_site_identity, join_federation, provision_federation
from medtwin.experiments import cli_site
from medtwin.experiments.cli import app

SITES = ("cleveland", "hungarian")


@pytest.fixture
def site_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(cli_site, "console", Console(width=400, highlight=False))  # one table row per line
    kits = {site: tmp_path / site / "kit" for site in SITES}
    public = [init_site_identity(kits[site], site_id=site) for site in SITES]
    admin = provision_federation(tmp_path / "admin", federation_name="approve-test", site_public_files=public)
    for site in SITES:
        join_federation(kits[site], admin.manifest_path)
    path = tmp_path / "cleveland" / "site.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "site_id": "cleveland",
                "data": {"builtin": {"task": "fed_heart_disease", "index": 0}},
                "accept": {"tasks": ["fed_heart_disease"], "max_rounds": 20, "max_local_steps": 100},
                "privacy": {"max_epsilon": 3.0, "max_delta": 1e-4, "max_total_epsilon": 10.0},
                "evaluation": {"release": "dp", "epsilon_per_release": 0.25, "min_participants": 2},
                "approvals": "local",
                "kit_dir": str(kits["cleveland"]),
                "state_dir": str(tmp_path / "cleveland" / "state"),
            }
        )
    )
    return path


def _proposal(tmp_path: Path, **crypto: str) -> tuple[str, Path]:
    config = compose_config(
        ["privacy=dp", "privacy.target_epsilon=2", "federation.num_rounds=4", "strategy.local_steps=4", "strategy.batch_size=8"]
    )
    config = replace(config, run_id=f"run-{time.monotonic_ns()}")
    document = yaml.safe_load(config_to_yaml(config))
    document["crypto"] = {**document["crypto"], **crypto}
    path = tmp_path / "proposal.yaml"
    path.write_text(yaml.safe_dump(document))
    return config.run_id, path


def _approve(proposal: Path, site_file: Path):
    return CliRunner().invoke(app, ["site", "approve", str(proposal), "--site-file", str(site_file), "--yes"])


def _approvals(site_file: Path) -> dict:
    path = site_file.parent / "state" / "approvals.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_an_honest_proposal_is_shown_whole_and_its_approval_recorded(tmp_path: Path, site_file: Path) -> None:
    run_id, proposal = _proposal(tmp_path)
    result = _approve(proposal, site_file)
    assert result.exit_code == 0, result.output
    assert run_id in _approvals(site_file)
    for shown in ("seed", "42", "fedavg", "proximal_mu", "learning rate", "rounds x local steps", "4 x 4 (batch 8)",
                  "min sites per round", "clipping norm", "accountant rdp", "grad_sample_mode", "secure_mode",
                  "key set (none)"):  # fmt: skip
        assert shown in result.output, shown
    # the spend, plainly: training up to the DP target + DP metric releases, 0.25 per round x 4 rounds
    assert "up to ε=2 (DP target 2, site max_epsilon 3)" in result.output
    assert "ε=0.25 per release x 4 round(s) = ε=1" in result.output
    assert "at most ε=3 at this site (training + metric releases)" in result.output


@pytest.mark.parametrize(
    "key_id",
    [
        "none) [conceal]xx[/conceal]\nprivacy requested   DP eps=0.1, delta=1e-07 [conceal]",
        "[bold green]k1[/bold green]",
        "k1\n",
    ],
)
def test_a_key_id_carrying_markup_or_a_newline_is_refused_and_shown_inertly(
    tmp_path: Path, site_file: Path, key_id: str
) -> None:
    run_id, proposal = _proposal(tmp_path, name="plain", key_id=key_id)
    result = _approve(proposal, site_file)
    assert result.exit_code == 1, result.output
    assert "crypto.key_id" in result.output
    assert not any(line.startswith("privacy requested") for line in result.output.splitlines())  # no forged row
    if "[" in key_id:
        assert "[conceal]" in result.output or "[bold green]" in result.output  # printed as text, not applied
    assert run_id not in _approvals(site_file)


def test_shown_values_cannot_style_or_split_the_table() -> None:
    assert cli_site._shown("a[/]\n[red]b") == "a\\[/]\\n\\[red]b"
    console = Console(width=200, record=True)
    console.print(cli_site._shown("x [conceal]hidden[/conceal]\ry"))
    assert console.export_text() == "x [conceal]hidden[/conceal]\\ry\n"
