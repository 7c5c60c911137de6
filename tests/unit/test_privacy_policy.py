"""A site's own policy, read from node_config or a file, decides what DP requests it accepts."""

from __future__ import annotations

import math

import pytest

from medtwin.client.privacy import (
    PrivacyRequest,
    SitePolicy,
    SitePolicyError,
    check_request,
    load_site_policy,
)

POLICY = SitePolicy(max_epsilon=3.0, max_delta=1e-5, min_noise_multiplier=0.5, max_grad_norm=2.0)


def request(**change):
    values = {"target_epsilon": 1.0, "target_delta": 1e-5, "max_grad_norm": 1.0, "noise_multiplier": 0.9}
    return PrivacyRequest(**{**values, **change})


def test_compliant_request_is_allowed():
    decision = check_request(POLICY, request())
    assert decision.allowed
    assert "within site policy" in decision.reason


def test_epsilon_above_the_site_maximum_is_refused_with_a_readable_reason():
    decision = check_request(POLICY, request(target_epsilon=8.0))
    assert not decision.allowed
    assert decision.reason == "requested epsilon 8.0 exceeds this site's max_epsilon 3.0"


def test_every_violation_is_listed():
    decision = check_request(POLICY, request(target_delta=1e-3, noise_multiplier=0.1, max_grad_norm=5.0))
    assert not decision.allowed
    assert "delta 0.001 exceeds this site's max_delta 1e-05" in decision.reason
    assert "noise multiplier 0.1 is below this site's min_noise_multiplier 0.5" in decision.reason
    assert "clipping norm 5.0 exceeds this site's max_clipping_norm 2.0" in decision.reason


def test_a_run_without_dp_is_refused_by_a_finite_budget():
    assert not check_request(POLICY, request(target_epsilon=math.inf, noise_multiplier=0.0)).allowed


def test_policy_from_node_config_strings_and_numbers():
    node_config = {
        "site-index": 0,
        "data-path": "/data/h0",
        "max-epsilon": "3.0",
        "max-delta": 1e-5,
        "min-noise-multiplier": 0.5,
        "max-clipping-norm": "2",
    }
    assert load_site_policy(node_config) == POLICY


def test_missing_policy_is_an_error_in_deployment_and_the_fallback_in_simulation():
    with pytest.raises(SitePolicyError, match="max-epsilon.*missing.*--node-config"):
        load_site_policy({"site-index": 0})
    fallback = SitePolicy(max_epsilon=10.0, max_delta=1e-4)
    assert load_site_policy({"partition-id": 1, "num-partitions": 4}, fallback=fallback) is fallback
    # a half-written policy never silently becomes the fallback
    with pytest.raises(SitePolicyError, match="max-delta"):
        load_site_policy({"max-epsilon": 1.0}, fallback=fallback)


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"max_epsilon": 3.0, "max-delta": 1e-5}, "misspelt.*max-epsilon"),
        ({"max-epsilon": "lots", "max-delta": 1e-5}, "expected a number, got 'lots'"),
        ({"max-epsilon": -1.0, "max-delta": 1e-5}, ">= 0"),
        ({"max-epsilon": 1.0, "max-delta": 1.5}, "max-delta.*< 1"),
    ],
)
def test_bad_policy_values_are_reported_with_their_key(node_config, message):
    with pytest.raises(SitePolicyError, match=message):
        load_site_policy(node_config)


def test_policy_file_toml_and_yaml(tmp_path):
    toml_file = tmp_path / "privacy.toml"
    toml_file.write_text(
        "[privacy]\nmax-epsilon = 3.0\nmax-delta = 1e-5\nmin-noise-multiplier = 0.5\nmax-clipping-norm = 2.0\n"
    )
    assert load_site_policy({"privacy-policy": str(toml_file), "max-epsilon": 99.0}) == POLICY  # the file wins
    yaml_file = tmp_path / "privacy.yaml"
    yaml_file.write_text("max-epsilon: 2.0\nmax-delta: 1.0e-6\nmax-total-epsilon: 10.0\n")
    policy = load_site_policy({"privacy-policy": str(yaml_file)})
    assert (policy.max_epsilon, policy.max_delta, policy.max_total_epsilon) == (2.0, 1e-6, 10.0)


def test_policy_file_with_an_unknown_key_is_refused(tmp_path):
    policy_file = tmp_path / "privacy.toml"
    policy_file.write_text("max-epsilon = 3.0\nmax-delta = 1e-5\nmax-epsilonn = 1.0\n")
    with pytest.raises(SitePolicyError, match=r"unknown key\(s\) \['max-epsilonn'\]"):
        load_site_policy({"privacy-policy": str(policy_file)})


def test_missing_policy_file_is_reported(tmp_path):
    with pytest.raises(SitePolicyError, match="cannot read"):
        load_site_policy({"privacy-policy": str(tmp_path / "absent.toml")})
