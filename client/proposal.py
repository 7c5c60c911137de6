"""A coordinator's run request is a proposal: plain data, read field by field, within the site file's bounds.

The text is parsed with a `yaml.SafeLoader` that also refuses anchors and aliases (`&a`/`*a`: a
1.7 KB text could otherwise expand to gigabytes) and duplicate keys — no OmegaConf, no
interpolation, no resolvers — and any `${…}` anywhere refuses the whole proposal before a single
value is used. Every value is type- and range-checked; a refusal message describes an untrusted
value by its type, or a bounded prefix, never by `str()` of something of unknown size. Only the fields below
are read; everything else in the text (the coordinator's own paths, chain settings…) is ignored.
A path the site would use (`task.csv.site_files`) is refused: the site's data comes from its file.

    run_id, seed
    task.name, task.csv.{features, target, task_type, hidden_units}
    strategy.{name, proximal_mu, local_steps, batch_size, optimizer, learning_rate,
              server_optimizer, server_learning_rate, server_momentum, beta_1, beta_2, tau}
    federation.{num_rounds, min_sites}
    privacy.{name, target_epsilon, target_delta, max_grad_norm, accountant, grad_sample_mode,
             secure_mode, epsilon_tolerance, unit_rows}
    crypto.{name, key_id}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import yaml

from medtwin.core.config import (
    CryptoConfig,
    CsvColumnConfig,
    FederationConfig,
    MedtwinConfig,
    PrivacyConfig,
    StrategyConfig,
)
from medtwin.core.config.normalization import check_normalization
from medtwin.core.config.privacy import validate_privacy_config
from medtwin.core.config.task import VitalsConfig
from medtwin.core.config.validate import OPTIMIZERS, STRATEGIES, server_optimizer_problem
from medtwin.core.errors import ConfigError
from medtwin.core.hashing import config_hash
from medtwin.core.ids import check_id

from .site_file import SiteFile, VitalsWindowBounds

__all__ = [
    "MAX_HIDDEN_UNITS",
    "MAX_NESTING",
    "MAX_PROPOSAL_BYTES",
    "MAX_SEED",
    "ProposalRefused",
    "RunProposal",
    "parse_proposal",
]

MAX_PROPOSAL_BYTES = 256 * 1024
MAX_SEED = 2**63 - 1  # seeds are 0 <= seed <= MAX_SEED (numpy/torch take 64-bit seeds)
MAX_HIDDEN_UNITS = 4096
MAX_NESTING = 32  # a real proposal nests 4 deep; the cap keeps parsing independent of the recursion limit
_ECHO_CHARACTERS = 40


class ProposalRefused(Exception):
    """The site will not take part: `code` is a short label for the coordinator and the chain."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class RunProposal:
    run_id: str
    config_hash: str  # of the exact text the site parsed: what it approves
    config: MedtwinConfig  # the site's effective config: its own task/data, the proposal's accepted knobs


def parse_proposal(text: object, site: SiteFile) -> RunProposal:
    """Accept `text` as this site's run config, or raise `ProposalRefused` saying what and why."""
    if not isinstance(text, str) or not text:
        raise ProposalRefused("bad_proposal", "the run carries no proposal text")
    if len(text.encode("utf-8", errors="replace")) > MAX_PROPOSAL_BYTES:
        raise ProposalRefused("bad_proposal", f"the proposal is larger than {MAX_PROPOSAL_BYTES} bytes")
    if "${" in text:
        raise ProposalRefused(
            "interpolation",
            "the proposal contains `${…}`: sites never resolve interpolations or resolvers from a coordinator",
        )
    try:
        document = yaml.load(text, Loader=_ProposalLoader)  # noqa: S506 - a SafeLoader subclass
    except ProposalRefused:
        raise
    except yaml.YAMLError as error:
        raise ProposalRefused("bad_proposal", f"the proposal is not valid YAML ({str(error)[:200]})") from None
    except (ValueError, TypeError, RecursionError) as error:  # e.g. an int of more than 4300 digits, deep nesting
        raise ProposalRefused(
            "bad_proposal", f"the proposal cannot be read as plain YAML ({type(error).__name__}: {str(error)[:120]})"
        ) from None
    if not isinstance(document, dict):
        raise ProposalRefused("bad_proposal", "the proposal is not a mapping")
    fields = _Fields(document)
    run_id = fields.get("run_id", str, "")
    problem = check_id(run_id)
    if problem:
        raise ProposalRefused("bad_run_id", f"proposal `run_id`: {problem}")
    task = replace(_task(fields, site), normalization=fields.get("task.normalization", str, "site"))
    strategy = _strategy(fields, site)
    federation = FederationConfig(
        num_rounds=fields.get("federation.num_rounds", int, 1, minimum=1),
        min_sites=fields.get("federation.min_sites", int, 1, minimum=1),
        max_site_examples=fields.get("federation.max_site_examples", int, 1_000_000, minimum=1),
    )
    if federation.num_rounds > site.accept.max_rounds:
        raise ProposalRefused(
            "over_limit",
            f"proposal federation.num_rounds {federation.num_rounds} exceeds this site's accept.max_rounds "
            f"{site.accept.max_rounds} by {federation.num_rounds - site.accept.max_rounds}",
        )
    privacy = _privacy(fields)
    crypto = CryptoConfig(name=fields.get("crypto.name", str, "plain"), key_id=fields.get("crypto.key_id", str, ""))
    if crypto.name not in site.accept.crypto:
        raise ProposalRefused(
            "not_accepted", f"proposal crypto.name {crypto.name!r} is not in this site's accept.crypto {list(site.accept.crypto)}"
        )
    key_id_problem = check_id(crypto.key_id) if crypto.key_id else ""
    if key_id_problem:  # whatever the scheme: the key id is shown to the approver and becomes a folder name
        raise ProposalRefused("bad_proposal", f"proposal crypto.key_id must be empty or an id: {key_id_problem}")
    config = MedtwinConfig(
        task=task,
        strategy=strategy,
        federation=federation,
        privacy=privacy,
        crypto=crypto,
        seed=fields.get("seed", int, 42, minimum=0, maximum=MAX_SEED),
        run_id=run_id,
    )
    _check_normalization(fields, config, site)
    return RunProposal(run_id=run_id, config_hash=config_hash(text), config=config)


def _check_normalization(fields: _Fields, config: MedtwinConfig, site: SiteFile) -> None:
    """`task.normalization` as proposed, refused like at config load (e.g. `federated` with DP); with
    `federated` a CSV site also needs the proposal's feature ranges to be its own (all sites encode against them)."""
    mode = config.task.normalization
    try:
        check_normalization(config)
    except ConfigError as error:
        raise ProposalRefused("bad_proposal", str(error)) from None
    if mode != "federated" or config.task.csv is None:
        return
    proposed = fields.raw("task.csv.features") or []
    theirs = [(column.get("min"), column.get("max")) if isinstance(column, dict) else None for column in proposed]
    mine = [(column.min, column.max) for column in config.task.csv.features]
    if theirs != mine:
        raise ProposalRefused(
            "schema_mismatch",
            "federated normalisation encodes every feature against the schema's min/max, and the proposal's "
            "task.csv.features ranges differ from this site's site file",
        )


class _ProposalLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` refusing anchors, aliases, duplicate keys and deep nesting: the site reads what the text shows."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1 if event.start_mark is not None else "?"
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ProposalRefused(
                "bad_proposal",
                f"the proposal uses a YAML anchor or alias (`&name` / `*name`, line {line}): sites refuse them — "
                "write every value out",
            )
        if self._depth >= MAX_NESTING:
            raise ProposalRefused("bad_proposal", f"the proposal nests more than {MAX_NESTING} levels deep (line {line})")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        seen: set[tuple[str, str]] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if (key.tag, key.value) in seen:
                    raise ProposalRefused(
                        "bad_proposal",
                        f"the proposal repeats the key {_describe(key.value)} (line {key.start_mark.line + 1}): "
                        "each key may appear once",
                    )
                seen.add((key.tag, key.value))
        return node


def _describe(value: object) -> str:
    """A bounded description of an untrusted value for a message: never `str()` of something of unknown size."""
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**18 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        if len(value) <= _ECHO_CHARACTERS:
            return repr(value)
        return f"{value[:_ECHO_CHARACTERS]!r}… (a str of {len(value)} characters)"
    return f"a {type(value).__name__}"


class _Fields:
    """Dotted, typed reads from an untrusted mapping; a wrong type refuses the proposal."""

    def __init__(self, document: dict) -> None:
        self.document = document

    def raw(self, dotted: str) -> Any:
        node: Any = self.document
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def get(
        self, dotted: str, kind: type, default: Any, *, minimum: float | None = None, maximum: float | None = None
    ) -> Any:
        value = self.raw(dotted)
        if value is None:
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is float and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            raise ProposalRefused("bad_proposal", f"proposal `{dotted}` must be {kind.__name__}, got {_describe(value)}")
        if kind is float and not math.isfinite(value):
            raise ProposalRefused("bad_proposal", f"proposal `{dotted}` must be finite, got {_describe(value)}")
        if minimum is not None and value < minimum:
            raise ProposalRefused("bad_proposal", f"proposal `{dotted}` must be >= {minimum}, got {_describe(value)}")
        if maximum is not None and value > maximum:
            raise ProposalRefused("bad_proposal", f"proposal `{dotted}` must be <= {maximum}, got {_describe(value)}")
        if kind is str and (len(value) > 256 or not value.isascii()):
            raise ProposalRefused("bad_proposal", f"proposal `{dotted}` must be ASCII of at most 256 characters")
        return value


def _vitals_windows(fields: _Fields, own: VitalsConfig, bounds: VitalsWindowBounds) -> VitalsConfig:
    """The twin's window (what the model looks like) comes from the proposal, within the site file's
    `accept.vitals`; the data (generated ward size, or the site's own streams) stays the site's. The
    task itself still refuses a grid and stride that would cut more windows than its memory budget."""
    window = {}
    for key, (low, high) in asdict(bounds).items():
        value = fields.get(f"task.vitals.{key}", float, getattr(own, key))
        if not low <= value <= high:
            raise ProposalRefused(
                "over_limit", f"proposal task.vitals.{key} {value:g} is outside this site's accept.vitals.{key} [{low:g}, {high:g}]"
            )
        window[key] = value
    return replace(own, **window)


def _task(fields: _Fields, site: SiteFile):
    name = fields.get("task.name", str, "")
    if name not in site.accept.tasks:
        raise ProposalRefused("not_accepted", f"proposal task {name!r} is not in this site's accept.tasks {list(site.accept.tasks)}")
    if name != site.data_task:
        raise ProposalRefused("not_accepted", f"proposal task {name!r} does not match this site's data ({site.data_task!r})")
    if fields.raw("task.csv.site_files"):
        raise ProposalRefused(
            "path_in_proposal",
            "the proposal names data files (task.csv.site_files): a coordinator never names a path at a site — "
            "each site's data path is in its own site file",
        )
    if name == "vitals":
        return replace(site.task, vitals=_vitals_windows(fields, site.task.vitals or VitalsConfig(), site.accept.vitals))
    if name != "csv":
        return site.task
    schema = site.task.csv
    assert schema is not None  # a csv site file always has a schema
    proposed = fields.raw("task.csv.features") or []
    if not isinstance(proposed, list):
        raise ProposalRefused("bad_proposal", "proposal `task.csv.features` must be a list")
    try:
        proposed_columns = [CsvColumnConfig(**column) for column in proposed]
    except TypeError as error:
        raise ProposalRefused("bad_proposal", f"proposal `task.csv.features`: {str(error)[:200]}") from None
    mine = [(column.name, column.type, list(column.categories)) for column in schema.features]
    theirs = [(column.name, column.type, list(column.categories)) for column in proposed_columns]
    target = fields.get("task.csv.target", str, "")
    task_type = fields.get("task.csv.task_type", str, "binary")
    if mine != theirs or target != schema.target or task_type != schema.task_type:
        raise ProposalRefused(
            "schema_mismatch",
            "the proposal's CSV schema (features, target, task_type) differs from this site's site file",
        )
    hidden_units = fields.get("task.csv.hidden_units", int, 16, minimum=0, maximum=MAX_HIDDEN_UNITS)
    return replace(site.task, csv=replace(schema, hidden_units=hidden_units))


def _strategy(fields: _Fields, site: SiteFile) -> StrategyConfig:
    strategy = StrategyConfig(
        name=fields.get("strategy.name", str, "fedavg"),
        proximal_mu=fields.get("strategy.proximal_mu", float, 0.0, minimum=0.0),
        local_steps=fields.get("strategy.local_steps", int, 1, minimum=1),
        batch_size=fields.get("strategy.batch_size", int, 1, minimum=1),
        optimizer=fields.get("strategy.optimizer", str, "sgd"),
        learning_rate=fields.get("strategy.learning_rate", float, 0.001),
        server_optimizer=fields.get("strategy.server_optimizer", str, "none"),
        server_learning_rate=fields.get("strategy.server_learning_rate", float, 1.0),
        server_momentum=fields.get("strategy.server_momentum", float, 0.0),
        beta_1=fields.get("strategy.beta_1", float, 0.9),
        beta_2=fields.get("strategy.beta_2", float, 0.99),
        tau=fields.get("strategy.tau", float, 0.001),
    )
    if strategy.name not in STRATEGIES or strategy.optimizer not in OPTIMIZERS or not strategy.learning_rate > 0:
        raise ProposalRefused(
            "bad_proposal",
            f"proposal strategy {strategy.name!r} / optimizer {strategy.optimizer!r} / learning_rate "
            f"{strategy.learning_rate} is not one this site runs ({STRATEGIES}, {OPTIMIZERS}, lr > 0)",
        )
    problem = server_optimizer_problem(strategy)
    if problem:
        raise ProposalRefused("bad_proposal", f"proposal {problem[0]}: {problem[1]}")
    accept = site.accept
    if strategy.server_optimizer not in accept.server_optimizers:
        raise ProposalRefused(
            "not_accepted",
            f"proposal strategy.server_optimizer {strategy.server_optimizer!r} is not in this site's "
            f"accept.server_optimizers {list(accept.server_optimizers)}",
        )
    if strategy.server_optimizer != "none" and strategy.server_learning_rate > accept.max_server_learning_rate:
        raise ProposalRefused(
            "over_limit",
            f"proposal strategy.server_learning_rate {strategy.server_learning_rate:g} exceeds this site's "
            f"accept.max_server_learning_rate {accept.max_server_learning_rate:g}",
        )
    if strategy.local_steps > accept.max_local_steps:
        raise ProposalRefused(
            "over_limit",
            f"proposal strategy.local_steps {strategy.local_steps} exceeds accept.max_local_steps "
            f"{accept.max_local_steps} by {strategy.local_steps - accept.max_local_steps}",
        )
    if not accept.min_batch_size <= strategy.batch_size <= accept.max_batch_size:
        raise ProposalRefused(
            "over_limit",
            f"proposal strategy.batch_size {strategy.batch_size} is outside this site's "
            f"[{accept.min_batch_size}, {accept.max_batch_size}]",
        )
    return strategy


def _privacy(fields: _Fields) -> PrivacyConfig:
    privacy = PrivacyConfig(
        name=fields.get("privacy.name", str, "none"),
        target_epsilon=fields.get("privacy.target_epsilon", float, 1.0),
        target_delta=fields.get("privacy.target_delta", float, 1e-5),
        max_grad_norm=fields.get("privacy.max_grad_norm", float, 1.0),
        accountant=fields.get("privacy.accountant", str, "rdp"),
        grad_sample_mode=fields.get("privacy.grad_sample_mode", str, PrivacyConfig.grad_sample_mode),
        secure_mode=fields.get("privacy.secure_mode", bool, False),
        epsilon_tolerance=fields.get("privacy.epsilon_tolerance", float, 0.01),
        unit_rows=fields.get("privacy.unit_rows", int, 8),
    )
    try:
        validate_privacy_config(privacy)
    except ConfigError as error:
        raise ProposalRefused("bad_proposal", f"proposal {error}") from None
    return privacy
