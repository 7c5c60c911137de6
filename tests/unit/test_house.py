"""The house rules of ARCHITECTURE.md section 2, enforced."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("core", "server", "client", "chain")
PACKAGE_FOLDERS = ("core", "server", "client", "chain", "configs", "experiments")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def forbidden_for(role: str) -> tuple[str, ...]:
    others = ("server", "client", "chain", "experiments")
    if role == "core":
        return others
    return tuple(other for other in others if other != role)


@pytest.mark.parametrize("role", ROLES)
def test_roles_import_only_core(role: str) -> None:
    offences = []
    for path in sorted((ROOT / role).rglob("*.py")):
        for module in imported_modules(path):
            parts = module.split(".")
            top = parts[1] if parts[0] == "medtwin" and len(parts) > 1 else parts[0]
            if top in forbidden_for(role):
                offences.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offences, "roles may import only medtwin.core:\n" + "\n".join(offences)


def test_dependency_checker_catches_a_cross_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("from medtwin.client.training import train_locally\nimport medtwin.core\n")
    found = {name.split(".")[1] for name in imported_modules(module) if name.startswith("medtwin.")}
    assert "client" in found and "client" in forbidden_for("server")


def test_every_package_folder_is_installed_under_medtwin() -> None:
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(settings["packages"])
    assert all(name.startswith("medtwin.") for name in listed), "nothing generic may land in site-packages"
    for folder in PACKAGE_FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT)
            dotted = "medtwin." + ".".join(relative.parts)
            assert dotted in listed, f"{relative} has an __init__.py but {dotted} is not in pyproject packages"


def test_installed_packages_resolve_to_the_repo_folders() -> None:
    import medtwin.chain
    import medtwin.client
    import medtwin.core
    import medtwin.server

    for module, folder in ((medtwin.core, "core"), (medtwin.server, "server"), (medtwin.client, "client"), (medtwin.chain, "chain")):
        assert Path(module.__file__).resolve().parent == ROOT / folder
