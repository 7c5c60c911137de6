"""A site's own setting: data, codec, privacy policy and budget ledger — never the coordinator's."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from medtwin.core.config import MedtwinConfig, config_from_yaml
from medtwin.core.tasks import SiteSplit, TwinTask, get_task

from .codec import CkksSiteCodec, PlainSiteCodec
from .privacy import BudgetLedger, SitePolicy, load_site_policy

SiteCodec = PlainSiteCodec | CkksSiteCodec
LEDGER_FILE = "privacy-ledger.json"


@dataclass(frozen=True)
class SiteLocal:
    """Settings that belong to the hospital: from its SuperNode node_config, or the simulation harness."""

    kit_dir: str = ""  # identity kit (+ HE secret context): `medtwin provision` / key steward
    state_dir: str = ""  # where the privacy ledger lives; must survive restarts
    policy: SitePolicy | None = None  # fallback when node_config carries no policy keys
    node_config: tuple[tuple[str, object], ...] = ()  # hashable copy: sites are cached per process

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, object], fallback: SiteLocal | None = None) -> SiteLocal:
        fallback = fallback or cls()
        return cls(
            kit_dir=str(node_config.get("kit-dir", fallback.kit_dir)),
            state_dir=str(node_config.get("state-dir", fallback.state_dir)),
            policy=fallback.policy,
            node_config=tuple(sorted(node_config.items())),
        )


@dataclass(frozen=True)
class Site:
    """Everything a site needs for one run."""

    config: MedtwinConfig
    task: TwinTask
    index: int
    data: SiteSplit
    codec: SiteCodec
    local: SiteLocal

    @property
    def site_id(self) -> str:
        return self.data.site_id

    def ledger(self) -> BudgetLedger:
        if not self.local.state_dir:
            raise KeyError("privacy=dp needs a durable site state folder: set node_config `state-dir`")
        return BudgetLedger(Path(self.local.state_dir) / LEDGER_FILE, self.site_id)

    def policy(self) -> SitePolicy:
        return load_site_policy(dict(self.local.node_config), fallback=self.local.policy)


def site_index_from_node_config(node_config: Mapping) -> int:
    for key in ("site-index", "partition-id"):
        if key in node_config:
            return int(node_config[key])
    raise KeyError("node_config needs `site-index` (deployment) or `partition-id` (simulation)")


@lru_cache(maxsize=4)
def load_site(config_yaml: str, index: int, local: SiteLocal) -> Site:
    config = config_from_yaml(config_yaml)
    task = get_task(config.task)
    codec: SiteCodec = PlainSiteCodec()
    if config.crypto.name == "ckks":
        if not local.kit_dir:
            raise KeyError("crypto=ckks needs this site's kit: set node_config `kit-dir` (from `medtwin provision`)")
        codec = CkksSiteCodec.from_kit(local.kit_dir)
    site = Site(config=config, task=task, index=index, data=task.load_site(index), codec=codec, local=local)
    if isinstance(codec, CkksSiteCodec) and codec.kit.site_id != site.site_id:
        raise KeyError(f"kit {local.kit_dir} belongs to {codec.kit.site_id!r}, but site index {index} holds {site.site_id!r}")
    return site


def dataset_manifest_hash(site: Site) -> str:
    """sha256 of a manifest of the site's data (shapes + digests of its arrays): a commitment, never the data."""
    digest = hashlib.sha256(f"medtwin/dataset/v1\x00{site.config.task.name}\x00{site.site_id}".encode())
    for array in (site.data.x_train, site.data.y_train, site.data.x_test, site.data.y_test):
        digest.update(repr(array.shape).encode())
        digest.update(hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest())
    return digest.hexdigest()
