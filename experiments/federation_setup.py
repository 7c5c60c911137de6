"""Set up a simulated federation's identities and keys, acting for every party on one machine.

In deployment each hospital and the coordinator run these steps themselves (`medtwin provision`,
`medtwin site keygen`, `medtwin site install-key`); in simulation the harness plays all of them,
keeping each party's files in its own kit folder. The coordinator's setup only ever names public files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from medtwin.core.config import MedtwinConfig
from medtwin.core.he import CkksParameters, ckks_parameters_from_config
from medtwin.core.identity import FederationManifest, install_he_secret, provision_federation, steward_generate_he_keys
from medtwin.core.model_vector import model_to_vector
from medtwin.core.tasks import get_task
from medtwin.server.app import CoordinatorSetup


@dataclass(frozen=True)
class SimulatedFederation:
    root: Path
    site_kits: dict[int, str] = field(default_factory=dict)  # site index -> kit folder
    coordinator: CoordinatorSetup = field(default_factory=CoordinatorSetup)
    he_parameters: CkksParameters | None = None
    manifest: FederationManifest | None = None


def kits_root(config: MedtwinConfig, run_id: str) -> Path:
    """Kits live beside, never inside, the coordinator's run directory."""
    return Path(config.runs_dir).resolve().parent / ".medtwin-kits" / run_id


def prepare_federation(config: MedtwinConfig, run_id: str) -> SimulatedFederation:
    """Identities whenever crypto or chains need them; CKKS keys from the first site as key steward."""
    if config.crypto.name == "plain" and config.chain.name == "none":
        return SimulatedFederation(root=kits_root(config, run_id))
    task = get_task(config.task)
    sites = task.load_all_sites()
    provisioned = provision_federation(
        kits_root(config, run_id), federation_name=run_id, site_ids=[site.site_id for site in sites]
    )
    site_kits = {index: str(provisioned.site_kits[site.site_id]) for index, site in enumerate(sites)}
    manifest_path = str(provisioned.coordinator_kit)
    if config.crypto.name == "plain":
        return SimulatedFederation(
            root=provisioned.root, site_kits=site_kits, coordinator=CoordinatorSetup(manifest_path=manifest_path), manifest=provisioned.manifest
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
        site_kits=site_kits,
        coordinator=CoordinatorSetup(public_context_path=str(distribution.public_context_path), manifest_path=manifest_path),
        he_parameters=parameters,
        manifest=provisioned.manifest,
    )
