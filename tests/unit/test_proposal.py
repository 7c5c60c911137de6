"""A proposal is untrusted text: hostile YAML is refused with a code, never expanded, echoed whole or let escape."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import yaml

from medtwin.client.proposal import MAX_HIDDEN_UNITS, MAX_NESTING, ProposalRefused, parse_proposal
from medtwin.client.site_file import SiteFile, site_file_from_mapping
from medtwin.core.config import compose_config, config_to_yaml

BUILTIN_SITE = {
    "site_id": "cleveland",
    "data": {"builtin": {"task": "fed_heart_disease", "index": 0}},
    "privacy": {"max_epsilon": 3.0, "max_delta": 1e-4},
    "kit_dir": "kit",
    "state_dir": "state",
}
CSV_FEATURES = [{"name": "age", "type": "float"}, {"name": "sex", "type": "categorical", "categories": ["f", "m"]}]
CSV_SITE = {
    **BUILTIN_SITE,
    "data": {"csv": {"path": "cardio.csv", "target": "readmitted", "task_type": "binary", "features": CSV_FEATURES}},
}


VITALS_SITE = {**BUILTIN_SITE, "data": {"builtin": {"task": "vitals", "index": 0}}}


def _site(tmp_path: Path, document: dict) -> SiteFile:
    return site_file_from_mapping(document, path=tmp_path / "site.yaml")


@cache
def _honest_text() -> str:
    return config_to_yaml(
        compose_config(
            ["privacy=dp", "privacy.target_epsilon=3", "federation.num_rounds=2", "strategy.batch_size=8", "run_id=run-1"]
        )
    )


def _refusal(text: str, site: SiteFile) -> ProposalRefused:
    with pytest.raises(ProposalRefused) as caught:
        parse_proposal(text, site)
    return caught.value


def _alias_bomb(levels: int) -> str:
    """`levels` levels of nine aliases each: at 9 levels 1.7 KB of text, 9**9 (387 million) scalars once expanded."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]" for level in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_the_honest_proposal_is_accepted(tmp_path: Path) -> None:
    proposal = parse_proposal(_honest_text(), _site(tmp_path, BUILTIN_SITE))
    assert proposal.run_id == "run-1" and proposal.config.federation.num_rounds == 2


def test_an_alias_bomb_in_seed_is_refused_as_an_alias(tmp_path: Path) -> None:
    # 6 levels keeps a regression (expanding the aliases into the message) to ~3 MB instead of a hang
    text = _alias_bomb(6) + _honest_text().replace("seed: 42", "seed: *l5")
    refused = _refusal(text, _site(tmp_path, BUILTIN_SITE))
    assert refused.code == "bad_proposal" and "alias" in refused.reason


def test_the_full_alias_bomb_is_refused_at_its_first_anchor(tmp_path: Path) -> None:
    text = _alias_bomb(9)  # not even a proposal: refused before any value is built
    assert len(text) < 2048
    refused = _refusal(text + _honest_text(), _site(tmp_path, BUILTIN_SITE))
    assert refused.code == "bad_proposal" and "line 1" in refused.reason


def test_an_anchor_alone_is_refused(tmp_path: Path) -> None:
    refused = _refusal("note: &n hello\n" + _honest_text(), _site(tmp_path, BUILTIN_SITE))
    assert refused.code == "bad_proposal" and "anchor" in refused.reason


def test_a_duplicated_key_is_refused(tmp_path: Path) -> None:
    text = _honest_text().replace("seed: 42", "seed: 42\nseed: 7")
    refused = _refusal(text, _site(tmp_path, BUILTIN_SITE))
    assert refused.code == "bad_proposal" and "seed" in refused.reason


def test_a_5000_digit_integer_is_a_refusal_not_a_crash(tmp_path: Path) -> None:
    text = _honest_text().replace("seed: 42", "seed: " + "9" * 5000)
    refused = _refusal(text, _site(tmp_path, BUILTIN_SITE))
    assert refused.code == "bad_proposal" and len(refused.reason) < 400


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 20_000])
def test_deeply_nested_yaml_is_a_refusal_not_a_crash(tmp_path: Path, depth: int) -> None:
    text = _honest_text() + "deep: " + "[" * depth + "]" * depth + "\n"  # whatever the recursion limit
    refused = _refusal(text, _site(tmp_path, BUILTIN_SITE))
    assert refused.code == "bad_proposal" and "nests more than" in refused.reason


@pytest.mark.parametrize("seed", [-1, 2**63, 2**80, 10**1000])
def test_a_seed_outside_0_to_2_63_is_refused(tmp_path: Path, seed: int) -> None:
    refused = _refusal(_honest_text().replace("seed: 42", f"seed: {seed}"), _site(tmp_path, BUILTIN_SITE))
    assert refused.code == "bad_proposal" and "`seed`" in refused.reason
    assert str(10**20) not in refused.reason and len(refused.reason) < 400  # a huge int is described, not echoed


def test_the_largest_seed_is_accepted(tmp_path: Path) -> None:
    proposal = parse_proposal(_honest_text().replace("seed: 42", f"seed: {2**63 - 1}"), _site(tmp_path, BUILTIN_SITE))
    assert proposal.config.seed == 2**63 - 1


def test_a_wrong_typed_value_is_described_not_echoed(tmp_path: Path) -> None:
    payload = "[/conceal]" + "A" * 200
    refused = _refusal(_honest_text().replace("seed: 42", f"seed: '{payload}'"), _site(tmp_path, BUILTIN_SITE))
    assert refused.code == "bad_proposal" and "str of 210 characters" in refused.reason
    assert "A" * 50 not in refused.reason
    listed = _refusal(_honest_text().replace("seed: 42", "seed: [" + ", ".join(["x"] * 500) + "]"), _site(tmp_path, BUILTIN_SITE))
    assert "got a list" in listed.reason and "x, x" not in listed.reason


def _csv_proposal(hidden_units: int) -> str:
    document = yaml.safe_load(_honest_text())
    document["task"] = {
        "name": "csv",
        "csv": {"features": CSV_FEATURES, "target": "readmitted", "task_type": "binary", "hidden_units": hidden_units},
    }
    return yaml.safe_dump(document)


def test_hidden_units_are_bounded(tmp_path: Path) -> None:
    site = _site(tmp_path, CSV_SITE)
    assert parse_proposal(_csv_proposal(MAX_HIDDEN_UNITS), site).config.task.csv.hidden_units == MAX_HIDDEN_UNITS
    refused = _refusal(_csv_proposal(MAX_HIDDEN_UNITS + 1), site)
    assert refused.code == "bad_proposal" and "hidden_units" in refused.reason


@pytest.mark.parametrize(
    "key_id", ["none) [conceal]xx[/conceal]\nprivacy requested   DP eps=0.1", "[bold red]approved[/]", "k\n", "../keys"]
)
@pytest.mark.parametrize("scheme", ["plain", "ckks"])
def test_a_key_id_that_is_not_an_id_is_refused_for_every_scheme(tmp_path: Path, key_id: str, scheme: str) -> None:
    document = yaml.safe_load(_honest_text())
    document["crypto"] = {"name": scheme, "key_id": key_id}
    refused = _refusal(yaml.safe_dump(document), _site(tmp_path, BUILTIN_SITE))
    assert refused.code == "bad_proposal" and "crypto.key_id" in refused.reason


def test_an_empty_key_id_is_fine_for_plain(tmp_path: Path) -> None:
    document = yaml.safe_load(_honest_text())
    document["crypto"] = {"name": "plain", "key_id": ""}
    assert parse_proposal(yaml.safe_dump(document), _site(tmp_path, BUILTIN_SITE)).config.crypto.key_id == ""


def _vitals_proposal(*overrides: str) -> str:
    return config_to_yaml(compose_config(["task=vitals", "strategy.batch_size=8", "run_id=run-1", *overrides]))


def _vitals_site(tmp_path: Path, bounds: dict) -> SiteFile:
    return _site(tmp_path, {**VITALS_SITE, "accept": {"vitals": bounds}})


def test_a_site_with_a_narrower_accept_vitals_refuses_what_the_default_accepts(tmp_path: Path) -> None:
    text = _vitals_proposal("task.vitals.window_h=12")
    assert parse_proposal(text, _site(tmp_path, VITALS_SITE)).config.task.vitals.window_h == 12.0
    refused = _refusal(text, _vitals_site(tmp_path, {"window_h": [1, 6]}))
    assert refused.code == "over_limit"
    assert "task.vitals.window_h 12" in refused.reason and "accept.vitals.window_h [1, 6]" in refused.reason
    accepted = parse_proposal(_vitals_proposal("task.vitals.window_h=6"), _vitals_site(tmp_path, {"window_h": [1, 6]}))
    assert accepted.config.task.vitals.window_h == 6.0  # the bound is inclusive


def test_a_site_may_widen_accept_vitals_beyond_the_default(tmp_path: Path) -> None:
    text = _vitals_proposal("task.vitals.horizon_h=8")
    refused = _refusal(text, _site(tmp_path, VITALS_SITE))
    assert refused.code == "over_limit" and "accept.vitals.horizon_h [0.25, 6]" in refused.reason
    assert parse_proposal(text, _vitals_site(tmp_path, {"horizon_h": [0.25, 12]})).config.task.vitals.horizon_h == 8.0


@pytest.mark.parametrize(
    ("override", "key"),
    [("task.vitals.grid_min=1", "grid_min"), ("task.vitals.window_h=100", "window_h"),
     ("task.vitals.horizon_h=0.1", "horizon_h"), ("task.vitals.stride_h=48", "stride_h")],
)  # fmt: skip
def test_every_vitals_window_setting_is_held_to_the_sites_default_bound(tmp_path: Path, override: str, key: str) -> None:
    refused = _refusal(_vitals_proposal(override), _site(tmp_path, VITALS_SITE))
    assert refused.code == "over_limit" and f"accept.vitals.{key}" in refused.reason


def test_the_sites_bound_applies_to_a_window_the_proposal_leaves_out(tmp_path: Path) -> None:
    document = yaml.safe_load(_vitals_proposal())
    del document["task"]["vitals"]  # the site's own default window (3 h) is still held to its bound
    refused = _refusal(yaml.safe_dump(document), _vitals_site(tmp_path, {"window_h": [4, 6]}))
    assert refused.code == "over_limit" and "accept.vitals.window_h [4, 6]" in refused.reason


def test_a_vitals_window_of_the_wrong_type_is_a_bad_proposal(tmp_path: Path) -> None:
    refused = _refusal(_vitals_proposal().replace("window_h: 3.0", "window_h: [3]"), _site(tmp_path, VITALS_SITE))
    assert refused.code == "bad_proposal" and "task.vitals.window_h" in refused.reason
