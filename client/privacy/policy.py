"""The site's own privacy policy, and the check of a coordinator's DP request against it.

The policy comes from the hospital's SuperNode `node_config` (or a TOML/YAML file it names), never
from the coordinator: the site's policy always wins.

    flower-supernode --node-config 'site-index=0 max-epsilon=3.0 max-delta=1e-5 min-noise-multiplier=0.5'
    flower-supernode --node-config 'site-index=0 privacy-policy="/etc/medtwin/privacy.toml"'
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import SitePolicyError

__all__ = [
    "POLICY_FILE_KEY",
    "PolicyDecision",
    "PrivacyRequest",
    "SitePolicy",
    "check_request",
    "load_site_policy",
    "policy_from_mapping",
]

POLICY_FILE_KEY = "privacy-policy"  # node_config key naming a TOML/YAML policy file
_FIELDS = {  # policy key -> (SitePolicy field, required)
    "max-epsilon": ("max_epsilon", True),
    "max-delta": ("max_delta", True),
    "min-noise-multiplier": ("min_noise_multiplier", False),
    "max-clipping-norm": ("max_grad_norm", False),
    "max-total-epsilon": ("max_total_epsilon", False),
}


@dataclass(frozen=True)
class SitePolicy:
    """Limits one hospital accepts. Epsilon/delta limits are per run; `max_total_epsilon` caps the
    sum over all runs on this site's data (basic composition), None = no lifetime cap."""

    max_epsilon: float
    max_delta: float
    min_noise_multiplier: float = 0.0
    max_grad_norm: float = math.inf  # largest clipping norm C accepted
    max_total_epsilon: float | None = None


@dataclass(frozen=True)
class PrivacyRequest:
    """What the coordinator's run asks of this site, with the noise multiplier calibrated for it."""

    target_epsilon: float  # math.inf when the run asks for no DP at all
    target_delta: float
    max_grad_norm: float
    noise_multiplier: float


@dataclass(frozen=True)
class PolicyDecision:
    allowed: bool
    reason: str


def check_request(policy: SitePolicy, request: PrivacyRequest) -> PolicyDecision:
    """Allow the request only if it meets every limit of the site's policy; list every violation."""
    violations = []
    if request.target_epsilon > policy.max_epsilon:
        violations.append(
            f"requested epsilon {float(request.target_epsilon)} exceeds this site's max_epsilon "
            f"{float(policy.max_epsilon)}"
        )
    if request.target_delta > policy.max_delta:
        violations.append(
            f"requested delta {float(request.target_delta)} exceeds this site's max_delta {float(policy.max_delta)}"
        )
    if request.noise_multiplier < policy.min_noise_multiplier:
        violations.append(
            f"noise multiplier {request.noise_multiplier:.4g} is below this site's min_noise_multiplier "
            f"{policy.min_noise_multiplier:g}"
        )
    if request.max_grad_norm > policy.max_grad_norm:
        violations.append(
            f"requested clipping norm {float(request.max_grad_norm)} exceeds this site's max_clipping_norm "
            f"{float(policy.max_grad_norm)}"
        )
    if violations:
        return PolicyDecision(allowed=False, reason="; ".join(violations))
    return PolicyDecision(
        allowed=True,
        reason=(
            f"within site policy: epsilon {request.target_epsilon:g} <= {policy.max_epsilon:g}, "
            f"delta {request.target_delta:g} <= {policy.max_delta:g}, noise multiplier "
            f"{request.noise_multiplier:.4g} >= {policy.min_noise_multiplier:g}"
        ),
    )


def _number(value: object, *, key: str, source: str) -> float:
    if isinstance(value, bool):
        raise SitePolicyError(key, f"expected a number, got {value!r}", source=source)
    try:
        number = float(value)  # node_config may carry numbers as strings
    except (TypeError, ValueError):
        raise SitePolicyError(key, f"expected a number, got {value!r}", source=source) from None
    if math.isnan(number) or number < 0:
        raise SitePolicyError(key, f"must be a number >= 0, got {value!r}", source=source)
    return number


def policy_from_mapping(mapping: Mapping[str, object], *, source: str) -> SitePolicy:
    """Build a policy from `max-epsilon`-style keys; other keys (site-index, data-path...) are ignored."""
    for key in mapping:
        dashed = str(key).replace("_", "-")
        if dashed != key and dashed in _FIELDS:
            raise SitePolicyError(str(key), "misspelt policy key", source=source, fix=f"write it `{dashed}`")
    values: dict[str, float] = {}
    for key, (field_name, required) in _FIELDS.items():
        if key in mapping:
            values[field_name] = _number(mapping[key], key=key, source=source)
        elif required:
            raise SitePolicyError(
                key,
                "missing: this site has no privacy policy to check the coordinator's request against",
                source=source,
                fix="set max-epsilon and max-delta in the SuperNode's --node-config (or in the file named by "
                f"`{POLICY_FILE_KEY}`), e.g. 'max-epsilon=3.0 max-delta=1e-5'",
            )
    if values["max_delta"] >= 1:
        raise SitePolicyError("max-delta", f"must be < 1, got {values['max_delta']}", source=source)
    return SitePolicy(**values)


def _read_policy_file(path: Path) -> Mapping[str, object]:
    source = f"policy file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SitePolicyError(POLICY_FILE_KEY, f"cannot read the file: {error}", source=source) from error
    try:
        content = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise SitePolicyError(POLICY_FILE_KEY, f"cannot parse the file: {error}", source=source) from error
    if not isinstance(content, Mapping):
        raise SitePolicyError(POLICY_FILE_KEY, "expected a table of `max-epsilon = ...` keys", source=source)
    table = content.get("privacy", content)  # keys at top level or under [privacy]
    unknown = sorted(set(table) - set(_FIELDS))
    if unknown:
        raise SitePolicyError(
            str(unknown[0]), f"unknown key(s) {unknown}", source=source, fix=f"allowed keys: {sorted(_FIELDS)}"
        )
    return table


def load_site_policy(node_config: Mapping[str, object], *, fallback: SitePolicy | None = None) -> SitePolicy:
    """The site's policy: from the file named by `privacy-policy`, else from node_config's own keys.

    `fallback` is used only when node_config carries no policy at all (e.g. a simulation, where
    nodes get only partition-id); deployments should leave it None so a missing policy is an error.
    """
    if POLICY_FILE_KEY in node_config:
        path = Path(str(node_config[POLICY_FILE_KEY])).expanduser()
        return policy_from_mapping(_read_policy_file(path), source=f"policy file {path}")
    if fallback is not None and not any(key in node_config for key in _FIELDS):
        return fallback
    return policy_from_mapping(node_config, source="node_config")
