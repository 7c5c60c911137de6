"""A hospital runs only its own installed ClientApp, whatever FAB the coordinator submitted.

Flower's SuperNode installs the run's FAB (Flower App Bundle, chosen by the coordinator) and loads the
ClientApp its pyproject.toml names (`[tool.flwr.app.components] clientapp`) with
`flwr.supercore.object_ref.load_app`, which first puts the FAB's folder on `sys.path`. A FAB naming
`evil:app` (a module it ships), or shipping a module that shadows one the app imports later, would run
the coordinator's code inside the hospital, beside its data and keys. What the hospital approved is
the hash of its own installed role code (`medtwin.core.hashing.code_hash()`, pinned by
experiments/warm_preload.py), not the FAB's files; the party the boundary protects enforces it.

A site's ClientApp processes (its warm worker and one-off forks, both set up by
`site_worker.prepare_clientapp_process`) therefore load the app through `load_pinned_client_app`: it
reads the FAB's declared reference with Flower's config helpers (TOML only), refuses a FAB naming any
other app, and otherwise returns the site's installed object. The FAB's folder never goes on
`sys.path` and nothing is imported from it. A refusal fails the task as a ClientApp error, which
Flower reports to the coordinator; the site serves the next task.

The FAB's dependencies are never installed either (`uv sync` of coordinator-chosen packages into an
environment activated in the ClientApp process): a site does not count on the SuperLink or the
executor's arguments to keep that off.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import NoReturn

from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.common.config import get_project_config, get_project_dir
from flwr.supercore.superexec.dependency_installer import RuntimeDependencyInstallationError

from medtwin.core.errors import MedtwinError

__all__ = [
    "SITE_CLIENTAPP_REF", "ForeignClientAppError", "declared_client_app_ref", "installed_client_app", "load_pinned_client_app",
    "pin_site_client_app",
]  # fmt: skip

# The one ClientApp a site runs: its own installed code (medtwin's pyproject.toml names the same).
SITE_CLIENTAPP_REF = "medtwin.experiments.flower_apps:client_app"


class ForeignClientAppError(MedtwinError):
    """The run's FAB names a ClientApp other than the site's own."""


def declared_client_app_ref(project_dir: Path) -> object:
    """The `clientapp` an installed FAB's pyproject.toml declares (None if it declares none); reads TOML only."""
    components = get_project_config(project_dir)["tool"]["flwr"]["app"].get("components", {})
    return components.get("clientapp") if isinstance(components, dict) else None


def installed_client_app() -> ClientApp:
    """The site's own ClientApp object, from its installed medtwin (the forkserver imported it already)."""
    module_name, _, attribute = SITE_CLIENTAPP_REF.partition(":")
    client_app = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(client_app, ClientApp):
        raise LoadClientAppError(f"{SITE_CLIENTAPP_REF} is a {type(client_app).__name__}, not a flwr ClientApp")
    return client_app


def load_pinned_client_app(fab_id: str, fab_version: str, fab_hash: str) -> ClientApp:
    """Flower's ClientApp loader contract (the installed FAB's id, version and hash): the site's own app if
    the FAB declares it, `ForeignClientAppError` naming both references otherwise."""
    try:
        declared = declared_client_app_ref(get_project_dir(fab_id, fab_version, fab_hash))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise LoadClientAppError(f"cannot read the clientapp that FAB {fab_id} {fab_version} (hash {fab_hash}) declares: {error}") from error
    if declared != SITE_CLIENTAPP_REF:
        raise ForeignClientAppError(
            f"this hospital runs only medtwin's own ClientApp {SITE_CLIENTAPP_REF!r} (its installed code, which its "
            f"approval covers); the run's FAB {fab_id} {fab_version} (hash {fab_hash[:12]}) declares clientapp = {declared!r} "
            f"in [tool.flwr.app.components] of its pyproject.toml — submit the run from medtwin's own app directory, "
            f"whose pyproject.toml names {SITE_CLIENTAPP_REF!r}"
        )
    return installed_client_app()


def _pinned_load_client_app_fn(default_app_ref: str, app_path: str | None, multi_app: bool) -> Callable[[str, str, str], ClientApp]:
    """`flwr.clientapp.utils.get_load_client_app_fn`'s contract; whatever reference or app path it is given,
    the loader is `load_pinned_client_app`."""
    return load_pinned_client_app


def _refuse_app_dependencies(project_dir: str | Path, *_: object, **__: object) -> NoReturn:
    raise RuntimeDependencyInstallationError(
        f"this hospital does not install a FAB's dependencies (the FAB installed at {project_dir} asked for them); "
        "its ClientApp runs on the site's own environment"
    )


def pin_site_client_app(run_clientapp: ModuleType) -> None:
    """Make Flower's ClientApp process (`flwr.supernode.runtime.run_clientapp`) load only the site's own app
    and never install a FAB's dependencies. Raises if Flower no longer loads or installs through these names,
    so an upgrade cannot silently reopen the hole (flwr is pinned in pyproject)."""
    for name in ("get_load_client_app_fn", "install_app_dependencies"):
        if not callable(getattr(run_clientapp, name, None)):
            raise RuntimeError(f"{run_clientapp.__name__} no longer calls {name}: the site's ClientApp pinning must be redone for this flwr")
    run_clientapp.get_load_client_app_fn = _pinned_load_client_app_fn
    run_clientapp.install_app_dependencies = _refuse_app_dependencies
