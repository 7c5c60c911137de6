"""Set up a simulated federation's identities and keys, acting for every party on one machine.

In deployment each hospital and the coordinator run these steps themselves (`medtwin provision`,
`medtwin site keygen`, `medtwin site install-key`); in simulation the harness plays all of them,
keeping each party's files in its own kit folder. The coordinator's setup only ever names public files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from medtwin.client.privacy import SitePolicy, policy_from_mapping
from medtwin.client.site import SiteLocal
from medtwin.core.config import MedtwinConfig
from medtwin.core.he import CkksParameters, ckks_parameters_from_config
from medtwin.core.identity import (
    FederationManifest,
    ProvisionedFederation,
    install_he_secret,
    load_manifest,
    provision_federation,
    steward_generate_he_keys,
)
from medtwin.core.model_vector import model_to_vector
from medtwin.core.tasks import get_task
from medtwin.server.app import CoordinatorSetup


SITE_POLICIES = Path(__file__).resolve().parent.parent / "configs" / "sites" / "simulation.yaml"


@dataclass(frozen=True)
class SimulatedFederation:
    root: Path
    sites: dict[int, SiteLocal] = field(default_factory=dict)  # site index -> that hospital's own settings
    coordinator: CoordinatorSetup = field(default_factory=CoordinatorSetup)
    he_parameters: CkksParameters | None = None
    manifest: FederationManifest | None = None


def kits_root(config: MedtwinConfig, run_id: str) -> Path:
    """Kits live beside, never inside, the coordinator's run directory."""
    return Path(config.runs_dir).resolve().parent / ".medtwin-kits" / config.task.name / "runs" / run_id


def stable_identities(config: MedtwinConfig, site_ids: list[str]) -> Path:
    """A simulated hospital keeps one identity across runs (as a real one would): provisioned once per task."""
    root = Path(config.runs_dir).resolve().parent / ".medtwin-kits" / config.task.name / "identity"
    if not (root / "federation.json").is_file():
        provision_federation(root, federation_name=f"medtwin-{config.task.name}", site_ids=site_ids)
    return root


def provision_run_kits(config: MedtwinConfig, run_id: str, site_ids: list[str]) -> ProvisionedFederation:
    """This run's copy of the stable kits (it gets its own CKKS keys); identities stay the same."""
    root = kits_root(config, run_id)
    shutil.copytree(stable_identities(config, site_ids), root)  # copytree keeps the 0600/0700 modes
    kits = {site_id: root / "sites" / site_id for site_id in site_ids}
    return ProvisionedFederation(
        root=root, manifest=load_manifest(root / "coordinator"), coordinator_kit=root / "coordinator", site_kits=kits, ca_dir=root / "ca"
    )


def site_state_dir(config: MedtwinConfig, site_id: str) -> Path:
    """A simulated hospital's durable state (privacy ledger): stable across runs, never reset by one."""
    return Path(config.runs_dir).resolve().parent / ".medtwin-sites" / site_id


def simulated_policies(site_ids: list[str], path: Path | None = None) -> dict[str, SitePolicy]:
    path = SITE_POLICIES if path is None else Path(path)
    document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    default = document.get("default", {})
    overrides = document.get("sites") or {}
    return {
        site_id: policy_from_mapping({**default, **overrides.get(site_id, {})}, source=f"{path} (site {site_id})")
        for site_id in site_ids
    }


def site_settings(config: MedtwinConfig, site_ids: list[str], kits: dict[str, Path]) -> dict[int, SiteLocal]:
    policies = simulated_policies(site_ids)
    return {
        index: SiteLocal(
            kit_dir=str(kits.get(site_id, "")),
            state_dir=str(site_state_dir(config, site_id)),
            policy=policies[site_id],
        )
        for index, site_id in enumerate(site_ids)
    }


def prepare_federation(config: MedtwinConfig, run_id: str) -> SimulatedFederation:
    """Identities whenever crypto or chains need them; CKKS keys from the first site as key steward."""
    task = get_task(config.task)
    site_ids = task.site_ids()
    if config.crypto.name == "plain" and config.chain.name == "none":
        return SimulatedFederation(root=kits_root(config, run_id), sites=site_settings(config, site_ids, {}))
    sites = task.load_all_sites()
    provisioned = provision_run_kits(config, run_id, site_ids)
    site_locals = site_settings(config, site_ids, provisioned.site_kits)
    manifest_path = str(provisioned.coordinator_kit)
    if config.crypto.name == "plain":
        return SimulatedFederation(
            root=provisioned.root, sites=site_locals, coordinator=CoordinatorSetup(manifest_path=manifest_path), manifest=provisioned.manifest
        )
    crypto = config.crypto
    if crypto.max_total_examples <= 0:  # 0 = bound from the sites' declared training-set sizes
        crypto = replace(crypto, max_total_examples=2 * sum(site.num_train for site in sites))
    torch.manual_seed(config.seed)
    num_parameters = int(model_to_vector(task.build_model()).size)
    parameters = ckks_parameters_from_config(crypto, num_parameters=num_parameters, num_sites=len(sites))
    steward_kit = provisioned.site_kits[sites[0].site_id]
    distribution = steward_generate_he_keys(steward_kit, parameters, outbox_dir=provisioned.root / "steward-outbox")
    for site_id, envelope in distribution.envelope_paths.items():
        install_he_secret(provisioned.site_kits[site_id], envelope)
    return SimulatedFederation(
        root=provisioned.root,
        sites=site_locals,
        coordinator=CoordinatorSetup(public_context_path=str(distribution.public_context_path), manifest_path=manifest_path),
        he_parameters=parameters,
        manifest=provisioned.manifest,
    )
