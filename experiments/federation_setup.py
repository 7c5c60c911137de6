"""Set up a simulated federation's identities and keys, acting for every party on one machine.

The harness runs the same steps as real parties, with the same functions (ARCHITECTURE.md section 4):

    each hospital   `init_site_identity` once, in its own stable kit   (`medtwin site init`)
    the admin       `provision_federation` from the sites' PUBLIC files (`medtwin provision`)
    each hospital   `join_federation` with the admin's federation.json  (`medtwin site join`)
    per CKKS run    the first site, as key steward, makes a new key set; the others install their
                    envelopes (`medtwin site keygen` / `medtwin site install-key`)

Folders (beside, never inside, the coordinator's runs/ folder; base = parent of runs_dir):

    <base>/.medtwin-sites/<task>/<site>/kit      the hospital's identity + HE key sets (kept across runs)
    <base>/.medtwin-sites/<task>/<site>/state    its durable state (privacy ledger)
    <base>/.medtwin-kits/<task>/admin            the admin: CA, coordinator kit, federation.json
    <base>/.medtwin-kits/<task>/runs/<run>/      per run: the steward's outbox (public context, envelopes)

The coordinator's setup only ever names public files.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from medtwin.core.config import MedtwinConfig
from medtwin.core.he import CkksParameters, run_ckks_parameters
from medtwin.core.identity import (
    FederationManifest,
    IdentityError,
    init_site_identity,
    install_he_secret,
    installed_he_key_ids,
    join_federation,
    load_manifest,
    provision_federation,
    read_site_public,
    steward_generate_he_keys,
)
from medtwin.core.model_vector import model_to_vector
from medtwin.core.rundir import exclusive_lock
from medtwin.core.tasks import TwinTask, get_task
from medtwin.server.app import CoordinatorSetup


SITE_PUBLIC_FILE = "site-public.json"
ADMIN_DIR = "admin"


@dataclass(frozen=True)
class SimulatedFederation:
    root: Path  # this run's folder for the harness's per-run files (the steward's outbox)
    coordinator: CoordinatorSetup = field(default_factory=CoordinatorSetup)
    he_parameters: CkksParameters | None = None
    manifest: FederationManifest | None = None
    kit_dirs: dict[str, Path] = field(default_factory=dict)  # site id -> its stable kit
    he_key_id: str = ""  # the CKKS key set of this run ("" for crypto=plain)


def base_dir(config: MedtwinConfig) -> Path:
    return Path(config.runs_dir).resolve().parent


def federation_name(config: MedtwinConfig) -> str:
    return f"medtwin-{config.task.name}"


def admin_root(config: MedtwinConfig) -> Path:
    """The simulated admin's folder for this task: CA, coordinator kit, federation.json."""
    return base_dir(config) / ".medtwin-kits" / config.task.name / ADMIN_DIR


def kits_root(config: MedtwinConfig, run_id: str) -> Path:
    """This run's harness folder (the steward's outbox); beside, never inside, the run directory."""
    return base_dir(config) / ".medtwin-kits" / config.task.name / "runs" / run_id


def site_root(config: MedtwinConfig, site_id: str) -> Path:
    return base_dir(config) / ".medtwin-sites" / config.task.name / site_id


def site_kit_dir(config: MedtwinConfig, site_id: str) -> Path:
    """A simulated hospital's own kit: its identity is made here once and kept across runs."""
    return site_root(config, site_id) / "kit"


def site_state_dir(config: MedtwinConfig, site_id: str) -> Path:
    """A simulated hospital's durable state (privacy ledger): stable across runs, never reset by one."""
    return site_root(config, site_id) / "state"


def simulated_identities(
    config: MedtwinConfig, site_ids: list[str]
) -> tuple[FederationManifest, Path, dict[str, Path]]:
    """Every hospital's stable identity, the admin's federation built from their public files, all joined.

    Returns (manifest, admin folder, site id -> kit). Idempotent: existing identities are kept; the
    admin re-provisions (into a fresh folder, the old one kept aside) only when the sites changed.
    """
    with exclusive_lock(base_dir(config) / ".medtwin-kits" / config.task.name / ".identities.lock"):
        kit_dirs = {site_id: site_kit_dir(config, site_id) for site_id in site_ids}
        public_files = []
        for site_id, kit in kit_dirs.items():
            public_path = kit / SITE_PUBLIC_FILE
            if not public_path.is_file():
                public_path = init_site_identity(kit, site_id=site_id)  # the hospital, on its machine
            public_files.append(public_path)
        admin = _current_admin(config, public_files)
        for kit in kit_dirs.values():
            join_federation(kit, admin / "federation.json")  # a no-op when already joined
        return load_manifest(admin), admin, kit_dirs


def _current_admin(config: MedtwinConfig, public_files: list[Path]) -> Path:
    """The admin folder whose manifest lists exactly these sites' public keys, provisioned if needed."""
    admin = admin_root(config)
    wanted = {entry.site_id: entry for entry in (read_site_public(path) for path in public_files)}
    if (admin / "federation.json").is_file():
        try:
            current = load_manifest(admin)
            if {entry.site_id: entry for entry in current.sites} == wanted:
                return admin
        except IdentityError:
            pass  # unreadable: provision afresh below, keeping the old folder aside
    admin.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(dir=admin.parent, prefix=f"{ADMIN_DIR}.new-"))
    provision_federation(fresh, federation_name=federation_name(config), site_public_files=public_files)
    if admin.exists():  # the admin never deletes a CA key: the old folder stays, renamed
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        admin.rename(admin.with_name(f"{ADMIN_DIR}.replaced-{stamp}"))
    fresh.rename(admin)
    return admin


def he_parameters_for(config: MedtwinConfig, task: TwinTask) -> CkksParameters:
    """The run's CKKS parameters: from the model size, the number of sites and the precision target
    (under DP-SGD, 1 % of the DP noise on the average: `he_precision_of_run`)."""
    max_total_examples = config.crypto.max_total_examples
    if max_total_examples <= 0:  # 0 = bound from the sites' declared training-set sizes
        max_total_examples = 2 * sum(site.num_train for site in task.load_all_sites())
    torch.manual_seed(config.seed)
    parameters, _ = run_ckks_parameters(
        config, num_parameters=int(model_to_vector(task.build_model()).size), num_sites=len(task.site_ids()),
        max_total_examples=max_total_examples, grouped_by_patient=task.groups_rows_by_patient,
    )  # fmt: skip
    return parameters


def prepare_federation(config: MedtwinConfig, run_id: str, *, he_key_id: str = "") -> SimulatedFederation:
    """Identities for every run (every reply is signed); with crypto=ckks a new key set from the first site,
    or — resuming a run — the key set `he_key_id` it already has (every site must still hold it)."""
    task = get_task(config.task)
    site_ids = task.site_ids()
    manifest, admin, kit_dirs = simulated_identities(config, site_ids)
    root = kits_root(config, run_id)
    manifest_path = str(admin / "coordinator" / "federation.json")
    if config.crypto.name != "ckks":
        return SimulatedFederation(
            root=root,
            coordinator=CoordinatorSetup(manifest_path=manifest_path),
            manifest=manifest,
            kit_dirs=kit_dirs,
        )
    parameters = he_parameters_for(config, task)
    steward = site_ids[0]
    if he_key_id:
        public_context = root / "steward-outbox" / "public_context.bin"
        missing = [site for site in site_ids if he_key_id not in installed_he_key_ids(kit_dirs[site])]
        if missing or not public_context.is_file():
            raise IdentityError(
                f"cannot resume with CKKS key set {he_key_id}: {missing or 'the public context'} no longer hold(s) it "
                f"({public_context}) — the run's encrypted aggregate cannot be decrypted; start a new run"
            )
        return SimulatedFederation(
            root=root,
            coordinator=CoordinatorSetup(public_context_path=str(public_context), manifest_path=manifest_path),
            he_parameters=parameters,
            manifest=manifest,
            kit_dirs=kit_dirs,
            he_key_id=he_key_id,
        )
    distribution = steward_generate_he_keys(kit_dirs[steward], parameters, outbox_dir=root / "steward-outbox")
    for site_id, envelope in distribution.envelope_paths.items():
        install_he_secret(kit_dirs[site_id], envelope)  # each hospital opens its own envelope
    return SimulatedFederation(
        root=root,
        coordinator=CoordinatorSetup(public_context_path=str(distribution.public_context_path), manifest_path=manifest_path),
        he_parameters=parameters,
        manifest=manifest,
        kit_dirs=kit_dirs,
        he_key_id=distribution.key_id,
    )
