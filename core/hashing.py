"""Hashes that name what a site approves: the resolved config and the code that will run."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding core/, client/, server/, ...
CODE_FOLDERS = ("core", "client", "server", "chain")


def config_hash(config_yaml: str) -> str:
    return hashlib.sha256(b"medtwin/config/v1\x00" + config_yaml.encode("utf-8")).hexdigest()


@lru_cache(maxsize=1)
def code_hash() -> str:
    """sha256 over every .py and .vy source of the roles, by relative path: what a site approves to run."""
    digest = hashlib.sha256(b"medtwin/code/v1\x00")
    for folder in CODE_FOLDERS:
        for path in sorted((PACKAGE_ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".vy") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\x00")
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
