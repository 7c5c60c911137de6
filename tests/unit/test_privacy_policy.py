"""A site's own policy, read from node_config or a file, decides what DP requests it accepts."""

from __future__ import annotations

import dataclasses
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
    assert decision.reason == "requested epsilon 8.0 exceeds this site's max_epsilon 3.0 by 5"


def test_every_violation_is_listed():
    decision = check_request(POLICY, request(target_delta=1e-3, noise_multiplier=0.1, max_grad_norm=5.0))
    assert not decision.allowed
    assert "delta 0.001 exceeds this site's max_delta 1e-05 by 0.00099" in decision.reason
    assert "noise multiplier 0.1 is below this site's min_noise_multiplier 0.5 by 0.4" in decision.reason
    assert "clipping norm 5.0 exceeds this site's max_clipping_norm 2.0 by 3" in decision.reason


def test_a_run_without_dp_is_refused_unless_the_site_waives_require_dp():
    no_dp = request(target_epsilon=math.inf, noise_multiplier=0.0)
    refused = check_request(POLICY, no_dp)
    assert not refused.allowed and "requires DP (require_dp)" in refused.reason
    assert check_request(dataclasses.replace(POLICY, require_dp=False), no_dp).allowed


def test_the_lifetime_cap_is_on_by_default_and_dp_is_required():
    policy = SitePolicy(max_epsilon=3.0, max_delta=1e-5)
    assert policy.max_total_epsilon == 10.0 and policy.require_dp is True
    assert load_site_policy({"max-epsilon": 3.0, "max-delta": 1e-5}) == policy


@pytest.mark.parametrize("cap", [math.inf, 0.0, -1.0, math.nan])
def test_the_lifetime_cap_cannot_be_switched_off(cap):
    with pytest.raises(SitePolicyError, match="max_total_epsilon"):
        SitePolicy(max_epsilon=3.0, max_delta=1e-5, max_total_epsilon=cap)


def test_every_bad_field_of_a_policy_is_listed_at_once():
    with pytest.raises(SitePolicyError) as raised:
        SitePolicy(max_epsilon=3.0, max_delta=1.5, max_total_epsilon=math.inf, require_dp="yes")
    message = str(raised.value)
    assert "max_delta must be < 1, got 1.5" in message
    assert "max_total_epsilon must be a finite number > 0, got inf" in message
    assert "require_dp must be true or false, got 'yes'" in message


def test_require_dp_and_the_lifetime_cap_from_node_config_and_files(tmp_path):
    policy = load_site_policy({"max-epsilon": "3", "max-delta": 1e-5, "require-dp": "false", "max-total-epsilon": "25"})
    assert (policy.require_dp, policy.max_total_epsilon) == (False, 25.0)
    assert load_site_policy({"max-epsilon": 3, "max-delta": 1e-5, "require-dp": True}).require_dp
    with pytest.raises(SitePolicyError, match="require-dp.*expected true or false, got 'maybe'"):
        load_site_policy({"max-epsilon": 3, "max-delta": 1e-5, "require-dp": "maybe"})
    yaml_file = tmp_path / "privacy.yaml"
    yaml_file.write_text("max-epsilon: 2.0\nmax-delta: 1.0e-6\nmax-total-epsilon: .inf\n")
    with pytest.raises(SitePolicyError, match=r"max-total-epsilon.*policy file .*privacy.yaml.*finite"):
        load_site_policy({"privacy-policy": str(yaml_file)})


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
