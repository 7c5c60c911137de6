"""The site's own privacy policy, and the check of a coordinator's DP request against it.

The policy comes from the hospital's SuperNode `node_config` (or a TOML/YAML file it names), never
from the coordinator: the site's policy always wins.

    flower-supernode --node-config 'site-index=0 max-epsilon=3.0 max-delta=1e-5 min-noise-multiplier=0.5'
    flower-supernode --node-config 'site-index=0 privacy-policy="/etc/medtwin/privacy.toml"'

Keys: max-epsilon, max-delta (required); min-noise-multiplier, max-clipping-norm,
max-total-epsilon (lifetime cap over all runs, default 10), require-dp (default true).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
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
    "require-dp": ("require_dp", False),
}
DEFAULT_MAX_TOTAL_EPSILON = 10.0


@dataclass(frozen=True)
class SitePolicy:
    """Limits one hospital accepts; validated on construction (`SitePolicyError` lists every problem).

    `max_epsilon`/`max_delta` bound each run; `max_total_epsilon` caps the sum over ALL runs and
    metric releases on this site's data (basic composition) — it is what stops a coordinator from
    escaping the per-run limit with fresh run ids, so it is always on and finite. `require_dp=False`
    lets runs without DP train (outside DP accounting: for synthetic or public data only).
    """

    max_epsilon: float
    max_delta: float
    min_noise_multiplier: float = 0.0
    max_grad_norm: float = math.inf  # largest clipping norm C accepted
    max_total_epsilon: float = DEFAULT_MAX_TOTAL_EPSILON
    require_dp: bool = True

    def __post_init__(self) -> None:
        _raise_problems(_policy_problems(self.__dict__), source="SitePolicy", name=lambda field: field)


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
    """Allow the request only if it meets every limit of the site's policy; list every violation, by how much."""
    if math.isinf(request.target_epsilon):
        if policy.require_dp:
            reason = (
                "the run asks for no differential privacy (epsilon inf); this site requires DP (require_dp) "
                f"with max_epsilon {float(policy.max_epsilon)}"
            )
            return PolicyDecision(allowed=False, reason=reason)
        return PolicyDecision(allowed=True, reason="the run asks for no DP, which this site allows (require_dp false)")
    violations = []
    if request.target_epsilon > policy.max_epsilon:
        violations.append(
            f"requested epsilon {float(request.target_epsilon)} exceeds this site's max_epsilon "
            f"{float(policy.max_epsilon)} by {request.target_epsilon - policy.max_epsilon:.4g}"
        )
    if request.target_delta > policy.max_delta:
        violations.append(
            f"requested delta {float(request.target_delta)} exceeds this site's max_delta {float(policy.max_delta)} "
            f"by {request.target_delta - policy.max_delta:.4g}"
        )
    if request.noise_multiplier < policy.min_noise_multiplier:
        violations.append(
            f"noise multiplier {request.noise_multiplier:.4g} is below this site's min_noise_multiplier "
            f"{policy.min_noise_multiplier:g} by {policy.min_noise_multiplier - request.noise_multiplier:.4g}"
        )
    if request.max_grad_norm > policy.max_grad_norm:
        violations.append(
            f"requested clipping norm {float(request.max_grad_norm)} exceeds this site's max_clipping_norm "
            f"{float(policy.max_grad_norm)} by {request.max_grad_norm - policy.max_grad_norm:.4g}"
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


def _policy_problems(values: Mapping[str, object]) -> list[tuple[str, str]]:
    """(field, problem) for every limit out of range; `values` holds every SitePolicy field."""
    problems = []
    for field_name in ("max_epsilon", "max_delta", "min_noise_multiplier", "max_total_epsilon", "max_grad_norm"):
        value = values[field_name]
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value) or value < 0:
            problems.append((field_name, f"must be a number >= 0, got {value!r}"))
    if not problems:
        if values["max_delta"] >= 1:
            problems.append(("max_delta", f"must be < 1, got {values['max_delta']!r}"))
        if math.isinf(values["max_epsilon"]):
            problems.append(("max_epsilon", "must be finite, got inf"))
        if math.isinf(values["max_total_epsilon"]) or values["max_total_epsilon"] <= 0:
            problems.append(
                (
                    "max_total_epsilon",
                    f"must be a finite number > 0, got {values['max_total_epsilon']!r} (the lifetime cap cannot be "
                    f"switched off; the default is {DEFAULT_MAX_TOTAL_EPSILON:g})",
                )
            )
        if math.isinf(values["min_noise_multiplier"]):
            problems.append(("min_noise_multiplier", "must be finite, got inf"))
    if not isinstance(values["require_dp"], bool):
        problems.append(("require_dp", f"must be true or false, got {values['require_dp']!r}"))
    return problems


def _raise_problems(problems: list[tuple[str, str]], *, source: str, name: Callable[[str], str]) -> None:
    if not problems:
        return
    if len(problems) == 1:
        field_name, problem = problems[0]
        raise SitePolicyError(name(field_name), problem, source=source)
    keys = ", ".join(name(field_name) for field_name, _ in problems)
    listed = "; ".join(f"{name(field_name)} {problem}" for field_name, problem in problems)
    raise SitePolicyError(keys, listed, source=source)


def _dashed(field_name: str) -> str:
    return next(key for key, (name, _) in _FIELDS.items() if name == field_name)


def _boolean(value: object, *, key: str, source: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "yes", "1"}:
        return True
    if text in {"false", "no", "0"}:
        return False
    raise SitePolicyError(key, f"expected true or false, got {value!r}", source=source)


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
    values: dict[str, float | bool] = {}
    for key, (field_name, required) in _FIELDS.items():
        if key in mapping:
            parse = _boolean if field_name == "require_dp" else _number
            values[field_name] = parse(mapping[key], key=key, source=source)
        elif required:
            raise SitePolicyError(
                key,
                "missing: this site has no privacy policy to check the coordinator's request against",
                source=source,
                fix="set max-epsilon and max-delta in the SuperNode's --node-config (or in the file named by "
                f"`{POLICY_FILE_KEY}`), e.g. 'max-epsilon=3.0 max-delta=1e-5'",
            )
    defaults = {field.name: field.default for field in fields(SitePolicy) if field.default is not MISSING}
    _raise_problems(_policy_problems({**defaults, **values}), source=source, name=_dashed)
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
