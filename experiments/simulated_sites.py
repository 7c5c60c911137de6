"""The simulated hospitals' site files and approvals: the harness stands in for each hospital.

Each simulated hospital gets a site file of the same schema a real one keeps (client/site_file.py),
written from the experiment's task config and configs/sites/simulation.yaml — or read from a folder
the researcher points at (`sites_dir=<folder>` with `<site_id>.yaml`). Its kit and state folders are
stable across runs (an identity and a privacy ledger never reset by a new run). Approving a run is
what each hospital's operator does with `medtwin site approve`; here the harness does it for them.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from medtwin.client.site_file import load_site_file
from medtwin.client.site_state import SiteApprovals
from medtwin.core.config import MedtwinConfig
from medtwin.core.hashing import code_hash, config_hash
from medtwin.core.rundir import atomic_write_text
from medtwin.core.tasks import get_task

SIMULATED_SITES = Path(__file__).resolve().parent.parent / "configs" / "sites" / "simulation.yaml"
INDEX_FILE = "index.json"  # partition id -> site file name (for Flower's own simulation engine)


def site_data_section(config: MedtwinConfig, index: int) -> dict:
    """The `data` section of simulated site `index`: its own path and schema (csv) or shipped dataset."""
    task = config.task
    if task.name != "csv":
        return {
            "builtin": {
                "task": task.name,
                "index": index,
                "num_sites": task.num_sites,
                "test_fraction": task.test_fraction,
                "split_seed": task.split_seed,
                "partition": dict(vars(task.partition)),
                **({"vitals": {"patients_per_site": task.vitals.patients_per_site, "hours": task.vitals.hours}} if task.vitals else {}),
            }
        }
    assert task.csv is not None
    csv_task = get_task(task)
    schema = task.csv
    return {
        "csv": {
            "path": str(csv_task.site_file(index).resolve()),
            "features": [
                {"name": column.name, "type": column.type, "categories": list(column.categories), "allow_missing": column.allow_missing}
                for column in schema.features
            ],
            "target": schema.target,
            "task_type": schema.task_type,
            "missing_policy": schema.missing_policy,
            "test_fraction": schema.test_fraction,
            "split_seed": task.split_seed,
        }
    }


def _merged(default: dict, override: dict) -> dict:
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in default.items()}
    for key, value in override.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


def write_site_files(
    config: MedtwinConfig,
    *,
    site_ids: list[str],
    kit_dirs: dict[str, Path],
    state_dirs: dict[str, Path],
    folder: Path,
    approvals: str,
    chain_state_dir: Path | None = None,
    settings_path: Path | None = None,
) -> dict[int, str]:
    """One site file per simulated hospital under `folder` (plus index.json); returns partition id -> path."""
    if config.sites_dir:
        return read_site_files(Path(config.sites_dir), site_ids)
    settings = yaml.safe_load((settings_path or SIMULATED_SITES).read_text(encoding="utf-8")) or {}
    overrides = settings.get("sites") or {}
    paths: dict[int, str] = {}
    for index, site_id in enumerate(site_ids):
        document = _merged(settings.get("default") or {}, overrides.get(site_id) or {})
        evaluation = document.setdefault("evaluation", {})
        evaluation.setdefault("min_participants", min(2, len(site_ids)))
        document["accept"] = {"tasks": [config.task.name], **document.get("accept", {})}
        document.update(
            site_id=site_id,
            research_simulation=True,
            data=site_data_section(config, index),
            approvals=approvals,
            **({"chain": {"state_dir": str(chain_state_dir)}} if approvals == "chain" and chain_state_dir else {}),
            kit_dir=str(kit_dirs[site_id]),
            state_dir=str(state_dirs[site_id]),
        )
        path = folder / f"{site_id}.yaml"
        atomic_write_text(path, yaml.safe_dump(document, sort_keys=False))
        load_site_file(path)  # the harness writes what a hospital could: fail here, not inside Ray
        paths[index] = str(path)
    index_document = {str(index): Path(path).name for index, path in paths.items()}
    atomic_write_text(folder / INDEX_FILE, json.dumps(index_document, indent=1) + "\n")
    return paths


def read_site_files(folder: Path, site_ids: list[str]) -> dict[int, str]:
    """A researcher's own folder of site files: `<site_id>.yaml` for every site of the task."""
    missing = [site_id for site_id in site_ids if not (folder / f"{site_id}.yaml").is_file()]
    if missing:
        from medtwin.core.errors import ConfigError

        raise ConfigError("sites_dir", f"{folder} has no site file for {missing}", "add <site_id>.yaml for every site of the task")
    for site_id in site_ids:
        load_site_file(folder / f"{site_id}.yaml")
    return {index: str(folder / f"{site_id}.yaml") for index, site_id in enumerate(site_ids)}


def approve_locally(site_files: dict[int, str], *, run_id: str, proposal_text: str) -> None:
    """Each simulated hospital approves (run id, config hash, code hash) in its own state folder."""
    for path in site_files.values():
        site_file = load_site_file(path)
        SiteApprovals(site_file.state_dir).approve(run_id=run_id, config_hash=config_hash(proposal_text), code_hash=code_hash())


def read_site_index(folder: Path) -> dict[int, str]:
    """The site files a run's harness wrote (index.json: partition id -> file), e.g. to resume the run."""
    index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
    return {int(partition): str(folder / name) for partition, name in index.items()}
