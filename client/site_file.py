"""The site file: what belongs to the hospital, read from its own disk — never from a coordinator.

    site_id: cleveland
    research_simulation: false        # true only for simulated sites of a research experiment
    data:                             # exactly one of `builtin`, `csv` or `vitals`
      csv: {path: /data/cardio.csv, target: readmitted, task_type: binary,
            features: [{name: age, type: float}, ...], missing_policy: reject, test_fraction: 0.3}
      # builtin: {task: fed_heart_disease, index: 0}          (datasets shipped with medtwin)
      # vitals: {path: /data/vitals.csv, test_fraction: 0.3}  (task vitals: long-format .csv or .parquet, or a FHIR R4 bundle .json)
    accept:                           # what a coordinator may ask of this site
      tasks: [csv]
      crypto: [ckks]
      max_rounds: 100
      max_local_steps: 2000
      min_batch_size: 1
      max_batch_size: 1024
      server_optimizers: [none, adam, yogi, avgm]   # steps this site applies to the average (default all)
      max_server_learning_rate: 1.0                 # the largest server step size it accepts
      vitals:                         # [min, max] a proposal's vitals window may take (defaults shown)
        grid_min: [5, 240]            # minutes
        window_h: [0.25, 24]          # hours of history the twin sees
        horizon_h: [0.25, 6]          # hours it forecasts
        stride_h: [0.25, 24]          # hours between windows (the task still refuses > 1 GiB of them)
    privacy:
      require_dp: true                # default true unless research_simulation
      max_epsilon: 3.0                # per run
      max_delta: 1.0e-5
      max_total_epsilon: 10.0         # lifetime, over every run on this data
      min_noise_multiplier: 0.3
      max_clipping_norm: 5.0
    evaluation:
      release: rounded                # exact | rounded | dp
      decimals: 3
      epsilon_per_release: 0.1        # release: dp
      min_participants: 2             # an aggregate of fewer sites is never decrypted
    approvals: local                  # local (state_dir/approvals.json) | chain (auth chain)
    chain: {state_dir: /srv/chain}    # approvals: chain — where this site reads both chains from;
                                      # anchor_wait_s (default 5): how long a round's anchor may take to land
    kit_dir: kit                      # identity keys + HE secrets (relative: to this file's folder)
    state_dir: state                  # privacy ledger, approvals, evaluations

Plain YAML (`yaml.safe_load`): no interpolation, no resolvers. Every problem is collected and
reported with the file and the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from medtwin.core.config import CsvColumnConfig, CsvSchemaConfig, PartitionConfig, TaskConfig
from medtwin.core.config.task import VitalsConfig
from medtwin.core.config.validate import SERVER_OPTIMIZERS
from medtwin.core.errors import MedtwinError
from medtwin.core.ids import check_id
from medtwin.core.tasks import registered_tasks

from .privacy import SitePolicy, SitePolicyError

__all__ = [
    "DEFAULT_VITALS_WINDOW_BOUNDS",
    "AcceptPolicy",
    "EvaluationPolicy",
    "SiteFile",
    "SiteFileError",
    "VitalsWindowBounds",
    "load_site_file",
    "site_file_from_mapping",
]

RELEASE_MODES = ("exact", "rounded", "dp")
APPROVAL_SOURCES = ("local", "chain")
DEFAULT_ANCHOR_WAIT_S = 5.0  # the coordinator sends a round's anchor in the background; it usually lands in ~0.1 s
MAX_ANCHOR_WAIT_S = 300.0
CRYPTO_SCHEMES = ("plain", "ckks")


class SiteFileError(MedtwinError):
    """The site file is missing, unreadable or invalid; lists every problem with its key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"site file {source}: {len(problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class VitalsWindowBounds:
    """`accept.vitals`: the [min, max] of each vitals window setting a proposal may ask for."""

    grid_min: tuple[float, float]  # minutes
    window_h: tuple[float, float]
    horizon_h: tuple[float, float]
    stride_h: tuple[float, float]


DEFAULT_VITALS_WINDOW_BOUNDS = VitalsWindowBounds(
    grid_min=(5.0, 240.0), window_h=(0.25, 24.0), horizon_h=(0.25, 6.0), stride_h=(0.25, 24.0)
)


@dataclass(frozen=True)
class AcceptPolicy:
    """Bounds on what a coordinator may set in a run proposal."""

    tasks: tuple[str, ...]
    crypto: tuple[str, ...] = CRYPTO_SCHEMES
    max_rounds: int = 100
    max_local_steps: int = 2000
    min_batch_size: int = 1
    max_batch_size: int = 1024
    vitals: VitalsWindowBounds = DEFAULT_VITALS_WINDOW_BOUNDS
    server_optimizers: tuple[str, ...] = SERVER_OPTIMIZERS
    max_server_learning_rate: float = 1.0


@dataclass(frozen=True)
class EvaluationPolicy:
    release: str = "rounded"
    decimals: int = 3
    epsilon_per_release: float = 0.1
    min_participants: int = 2
    # per-class 1000-bin score counts of the test rows (pooled AUROC/AUPRC/ECE): they place each test
    # row's label and score to 0.001, so a site releases them only if its file says so, never under dp
    score_histogram: bool = False


@dataclass(frozen=True)
class SiteFile:
    path: Path
    site_id: str
    task: TaskConfig  # the site's own data description (paths included)
    data_path: Path | None  # csv: the hospital's file
    builtin_index: int  # builtin: which of the task's sites this hospital is
    accept: AcceptPolicy
    privacy: SitePolicy
    evaluation: EvaluationPolicy
    approvals: str
    kit_dir: Path
    state_dir: Path
    research_simulation: bool = False
    chain_state_dir: Path | None = None  # approvals: chain — the chains' deployment record this site trusts
    anchor_wait_s: float = DEFAULT_ANCHOR_WAIT_S  # before evaluating: how long to wait for the round's anchor to land
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def data_task(self) -> str:
        return self.task.name


class _Reader:
    """Typed access to one mapping with every problem collected (never raises until `done`)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []

    def section(self, document: dict, key: str, *, required: bool = False, prefix: str = "") -> dict:
        value = document.get(key, None)
        if value is None:
            if required:
                self.problems.append(f"`{prefix}{key}` is missing")
            return {}
        if not isinstance(value, dict):
            self.problems.append(f"`{prefix}{key}` must be a mapping, got {type(value).__name__}")
            return {}
        return value

    def unknown(self, document: dict, allowed: set[str], prefix: str) -> None:
        for key in sorted(set(map(str, document)) - allowed):
            self.problems.append(f"unknown key `{prefix}{key}` (allowed: {', '.join(sorted(allowed))})")

    def value(self, document: dict, key: str, kind: type, default: Any, *, prefix: str = "", minimum: float | None = None) -> Any:
        if key not in document:
            return default
        raw = document[key]
        name = f"`{prefix}{key}`"
        if kind is float and isinstance(raw, int | float) and not isinstance(raw, bool):
            raw = float(raw)
        if kind is float and isinstance(raw, str):
            try:
                raw = float(raw)  # YAML reads 1e-5 (no dot) as a string
            except ValueError:
                pass
        if not isinstance(raw, kind) or (kind is int and isinstance(raw, bool)):
            self.problems.append(f"{name} must be {kind.__name__}, got {raw!r}")
            return default
        if kind is float and not math.isfinite(raw):
            self.problems.append(f"{name} must be finite, got {raw!r}")
            return default
        if minimum is not None and raw < minimum:
            self.problems.append(f"{name} must be >= {minimum}, got {raw!r}")
            return default
        return raw

    def bounds(self, document: dict, key: str, default: tuple[float, float], *, prefix: str = "") -> tuple[float, float]:
        """A `[min, max]` pair of finite numbers with 0 < min <= max."""
        if key not in document:
            return default
        raw = document[key]
        pair = raw if isinstance(raw, list) and len(raw) == 2 else []
        numbers = [number for number in map(_number, pair) if number is not None]
        if len(numbers) != 2 or not all(math.isfinite(end) for end in numbers) or not 0 < numbers[0] <= numbers[1]:
            self.problems.append(f"`{prefix}{key}` must be [min, max] with 0 < min <= max, got {raw!r}")
            return default
        return numbers[0], numbers[1]


def _number(raw: object) -> float | None:
    if isinstance(raw, str):
        try:
            return float(raw)  # YAML reads 1e3 (no dot) as a string
        except ValueError:
            return None
    return float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None


def load_site_file(path: str | Path) -> SiteFile:
    """Read and check a hospital's site file; relative paths in it are relative to its folder."""
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise SiteFileError(str(path), [f"cannot read it: {error.strerror or error}"]) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SiteFileError(str(path), [f"not valid YAML: {error}"]) from None
    if not isinstance(document, dict):
        raise SiteFileError(str(path), ["expected a mapping with site_id, data, privacy, ..."])
    return site_file_from_mapping(document, path=path)


def site_file_from_mapping(document: dict, *, path: Path) -> SiteFile:
    reader = _Reader(str(path))
    reader.unknown(
        document,
        {"site_id", "research_simulation", "data", "accept", "privacy", "evaluation", "approvals", "chain", "kit_dir", "state_dir"},
        "",
    )
    site_id = document.get("site_id")
    if not isinstance(site_id, str) or check_id(site_id):
        reader.problems.append(f"`site_id` {site_id!r}: {check_id(site_id) if isinstance(site_id, str) else 'must be a string'}")
        site_id = "invalid"
    research = reader.value(document, "research_simulation", bool, False)
    task, data_path, builtin_index = _data(reader, reader.section(document, "data", required=True), path.parent)
    accept = _accept(reader, reader.section(document, "accept"), default_task=task.name)
    privacy = _privacy(reader, reader.section(document, "privacy", required=True), research=research)
    evaluation = _evaluation(reader, reader.section(document, "evaluation"))
    approvals = reader.value(document, "approvals", str, "local")
    if approvals not in APPROVAL_SOURCES:
        reader.problems.append(f"`approvals` must be one of {APPROVAL_SOURCES}, got {approvals!r}")
    chain = reader.section(document, "chain")
    reader.unknown(chain, {"state_dir", "anchor_wait_s"}, "chain.")
    chain_state = reader.value(chain, "state_dir", str, "", prefix="chain.")
    anchor_wait_s = reader.value(chain, "anchor_wait_s", float, DEFAULT_ANCHOR_WAIT_S, prefix="chain.", minimum=0.0)
    if anchor_wait_s > MAX_ANCHOR_WAIT_S:
        reader.problems.append(
            f"`chain.anchor_wait_s` is {anchor_wait_s:g} s, above {MAX_ANCHOR_WAIT_S:g} s: a site waits this long for a "
            "round's anchor before refusing to evaluate it — keep it well under the coordinator's federation.round_timeout_s"
        )
    if approvals == "chain" and not chain_state:
        reader.problems.append("`approvals: chain` needs `chain.state_dir`: the chains' deployment record this site reads")
    folders = {}
    for key in ("kit_dir", "state_dir"):
        value = reader.value(document, key, str, "")
        if not value:
            reader.problems.append(f"`{key}` is missing: the site's {'identity kit' if key == 'kit_dir' else 'durable state'} folder")
        folders[key] = (path.parent / Path(value).expanduser()).resolve()
    if folders["kit_dir"] == folders["state_dir"]:
        reader.problems.append("`kit_dir` and `state_dir` must be different folders (the kit guards the ledger)")
    if reader.problems:
        raise SiteFileError(str(path), reader.problems)
    return SiteFile(
        path=path,
        site_id=site_id,
        task=task,
        data_path=data_path,
        builtin_index=builtin_index,
        accept=accept,
        privacy=privacy,
        evaluation=evaluation,
        approvals=approvals,
        kit_dir=folders["kit_dir"],
        state_dir=folders["state_dir"],
        research_simulation=research,
        chain_state_dir=(path.parent / Path(chain_state).expanduser()).resolve() if chain_state else None,
        anchor_wait_s=float(anchor_wait_s),
    )


def _data(reader: _Reader, data: dict, folder: Path) -> tuple[TaskConfig, Path | None, int]:
    reader.unknown(data, {"builtin", "csv", "vitals"}, "data.")
    if sum(key in data for key in ("builtin", "csv", "vitals")) != 1:
        reader.problems.append("`data` needs exactly one of `builtin`, `csv` or `vitals`")
        return TaskConfig(name="invalid"), None, 0
    if "vitals" in data:
        streams = reader.section(data, "vitals")
        reader.unknown(streams, {"path", "test_fraction", "split_seed"}, "data.vitals.")
        raw_path = reader.value(streams, "path", str, "", prefix="data.vitals.")
        if not raw_path:
            reader.problems.append("`data.vitals.path` is missing: the hospital's vital-sign streams (long-format .csv or .parquet, or FHIR .json)")
        task = TaskConfig(
            name="vitals", num_sites=1,
            test_fraction=reader.value(streams, "test_fraction", float, 0.3, prefix="data.vitals."),
            split_seed=reader.value(streams, "split_seed", int, 43, prefix="data.vitals."), vitals=VitalsConfig(),
        )  # fmt: skip
        return task, (folder / Path(raw_path).expanduser()).resolve() if raw_path else None, 0
    if "builtin" in data:
        builtin = reader.section(data, "builtin")
        reader.unknown(builtin, {"task", "index", "num_sites", "test_fraction", "split_seed", "partition", "vitals"}, "data.builtin.")
        name = reader.value(builtin, "task", str, "", prefix="data.builtin.")
        if name not in set(registered_tasks()) - {"csv"}:
            reader.problems.append(f"`data.builtin.task` {name!r} is not a shipped dataset: {sorted(set(registered_tasks()) - {'csv'})}")
        partition = reader.section(builtin, "partition")
        try:
            partition_config = PartitionConfig(**partition)
        except TypeError as error:
            reader.problems.append(f"`data.builtin.partition`: {error}")
            partition_config = PartitionConfig()
        task = TaskConfig(
            name=name,
            num_sites=reader.value(builtin, "num_sites", int, 4, prefix="data.builtin.", minimum=1),
            test_fraction=reader.value(builtin, "test_fraction", float, 0.34, prefix="data.builtin."),
            split_seed=reader.value(builtin, "split_seed", int, 43, prefix="data.builtin."),
            partition=partition_config,
            vitals=_generated_wards(reader, reader.section(builtin, "vitals")) if name == "vitals" else None,
        )
        index = reader.value(builtin, "index", int, 0, prefix="data.builtin.", minimum=0)
        return task, None, index
    csv = reader.section(data, "csv")
    allowed = {"path", "features", "target", "task_type", "missing_policy", "test_fraction", "split_seed"}
    reader.unknown(csv, allowed, "data.csv.")
    raw_path = reader.value(csv, "path", str, "", prefix="data.csv.")
    if not raw_path:
        reader.problems.append("`data.csv.path` is missing: the hospital's CSV file")
    features = []
    for position, column in enumerate(csv.get("features") or []):
        try:
            features.append(CsvColumnConfig(**column))
        except TypeError as error:
            reader.problems.append(f"`data.csv.features[{position}]`: {error}")
    schema = CsvSchemaConfig(
        site_files=[],
        features=features,
        target=reader.value(csv, "target", str, "", prefix="data.csv."),
        task_type=reader.value(csv, "task_type", str, "binary", prefix="data.csv."),
        missing_policy=reader.value(csv, "missing_policy", str, "reject", prefix="data.csv."),
        test_fraction=reader.value(csv, "test_fraction", float, 0.34, prefix="data.csv."),
    )
    task = TaskConfig(name="csv", num_sites=1, split_seed=reader.value(csv, "split_seed", int, 43, prefix="data.csv."), csv=schema)
    return task, (folder / Path(raw_path).expanduser()).resolve() if raw_path else None, 0


def _generated_wards(reader: _Reader, wards: dict) -> VitalsConfig:
    """`data.builtin.vitals`: the size of the generated wards this simulated site holds."""
    reader.unknown(wards, {"patients_per_site", "hours"}, "data.builtin.vitals.")
    return VitalsConfig(
        patients_per_site=reader.value(wards, "patients_per_site", int, 60, prefix="data.builtin.vitals.", minimum=2),
        hours=reader.value(wards, "hours", float, 48.0, prefix="data.builtin.vitals."),
    )


def _accept(reader: _Reader, accept: dict, *, default_task: str) -> AcceptPolicy:
    allowed = {
        "tasks", "crypto", "max_rounds", "max_local_steps", "min_batch_size", "max_batch_size", "vitals",
        "server_optimizers", "max_server_learning_rate",
    }  # fmt: skip
    reader.unknown(accept, allowed, "accept.")
    tasks = accept.get("tasks", [default_task])
    crypto = accept.get("crypto", list(CRYPTO_SCHEMES))
    if not isinstance(tasks, list) or not all(isinstance(name, str) for name in tasks):
        reader.problems.append(f"`accept.tasks` must be a list of task names, got {tasks!r}")
        tasks = []
    if not isinstance(crypto, list) or not set(crypto) <= set(CRYPTO_SCHEMES):
        reader.problems.append(f"`accept.crypto` must be a list drawn from {CRYPTO_SCHEMES}, got {crypto!r}")
        crypto = []
    server_optimizers = accept.get("server_optimizers", list(SERVER_OPTIMIZERS))
    if not isinstance(server_optimizers, list) or not set(server_optimizers) <= set(SERVER_OPTIMIZERS):
        reader.problems.append(f"`accept.server_optimizers` must be a list drawn from {SERVER_OPTIMIZERS}, got {server_optimizers!r}")
        server_optimizers = []
    policy = AcceptPolicy(
        tasks=tuple(tasks),
        crypto=tuple(crypto),
        max_rounds=reader.value(accept, "max_rounds", int, 100, prefix="accept.", minimum=1),
        max_local_steps=reader.value(accept, "max_local_steps", int, 2000, prefix="accept.", minimum=1),
        min_batch_size=reader.value(accept, "min_batch_size", int, 1, prefix="accept.", minimum=1),
        max_batch_size=reader.value(accept, "max_batch_size", int, 1024, prefix="accept.", minimum=1),
        vitals=_vitals_bounds(reader, reader.section(accept, "vitals", prefix="accept.")),
        server_optimizers=tuple(server_optimizers),
        max_server_learning_rate=reader.value(accept, "max_server_learning_rate", float, 1.0, prefix="accept.", minimum=0.0),
    )
    return policy


def _vitals_bounds(reader: _Reader, vitals: dict) -> VitalsWindowBounds:
    """`accept.vitals`: each setting's [min, max]; a setting left out keeps the default bound."""
    names = [setting.name for setting in fields(VitalsWindowBounds)]
    reader.unknown(vitals, set(names), "accept.vitals.")
    return VitalsWindowBounds(
        **{name: reader.bounds(vitals, name, getattr(DEFAULT_VITALS_WINDOW_BOUNDS, name), prefix="accept.vitals.") for name in names}
    )


def _privacy(reader: _Reader, privacy: dict, *, research: bool) -> SitePolicy:
    allowed = {"require_dp", "max_epsilon", "max_delta", "max_total_epsilon", "min_noise_multiplier", "max_clipping_norm"}
    reader.unknown(privacy, allowed, "privacy.")
    for key in ("max_epsilon", "max_delta"):
        if key not in privacy:
            reader.problems.append(f"`privacy.{key}` is missing: the site's per-run limit")
    values = dict(
        require_dp=reader.value(privacy, "require_dp", bool, not research, prefix="privacy."),
        max_epsilon=reader.value(privacy, "max_epsilon", float, 1.0, prefix="privacy.", minimum=0.0),
        max_delta=reader.value(privacy, "max_delta", float, 1e-5, prefix="privacy.", minimum=0.0),
        max_total_epsilon=reader.value(privacy, "max_total_epsilon", float, 10.0, prefix="privacy.", minimum=0.0),
        min_noise_multiplier=reader.value(privacy, "min_noise_multiplier", float, 0.0, prefix="privacy.", minimum=0.0),
        max_grad_norm=reader.value(privacy, "max_clipping_norm", float, math.inf, prefix="privacy.", minimum=0.0),
    )
    if values["max_delta"] >= 1:
        reader.problems.append(f"`privacy.max_delta` must be < 1, got {values['max_delta']}")
    if values["require_dp"] is False and not research:
        reader.problems.append(
            "`privacy.require_dp: false` is only allowed in a file marked `research_simulation: true` "
            "(a hospital's real data is never trained without DP)"
        )
    try:
        return SitePolicy(**values)
    except SitePolicyError as error:
        reader.problems.append(f"`privacy`: {error}")
        return SitePolicy(max_epsilon=1.0, max_delta=1e-5)


def _evaluation(reader: _Reader, evaluation: dict) -> EvaluationPolicy:
    reader.unknown(evaluation, {"release", "decimals", "epsilon_per_release", "min_participants", "score_histogram"}, "evaluation.")
    release = reader.value(evaluation, "release", str, "rounded", prefix="evaluation.")
    if release not in RELEASE_MODES:
        reader.problems.append(f"`evaluation.release` must be one of {RELEASE_MODES}, got {release!r}")
    policy = EvaluationPolicy(
        release=release,
        decimals=reader.value(evaluation, "decimals", int, 3, prefix="evaluation.", minimum=0),
        epsilon_per_release=reader.value(evaluation, "epsilon_per_release", float, 0.1, prefix="evaluation."),
        min_participants=reader.value(evaluation, "min_participants", int, 2, prefix="evaluation.", minimum=1),
        score_histogram=reader.value(evaluation, "score_histogram", bool, False, prefix="evaluation."),
    )
    if release == "dp" and policy.score_histogram:
        reader.problems.append("`evaluation.score_histogram: true` cannot be released under release: dp (it is row-level); set it to false")
    if release == "dp" and not policy.epsilon_per_release > 0:
        reader.problems.append("`evaluation.epsilon_per_release` must be > 0 with release: dp")
    return policy
