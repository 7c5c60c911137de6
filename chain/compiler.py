"""Compile the Vyper contracts, caching ABI + bytecode as JSON keyed by source sha256 + vyper version.

The cache (``contracts/build/<Name>.json``) ships as package data so installs need no compile.
It is regenerated automatically whenever the source or the vyper version changes; never edit it
by hand (`tests/unit/test_chain_contracts.py` checks it matches the source).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from .errors import ContractBuildError

__all__ = ["CONTRACT_NAMES", "CompiledContract", "build_path", "compile_contract", "load_contract", "source_path"]

CONTRACTS_DIR = Path(__file__).resolve().parent / "contracts"
BUILD_DIR = CONTRACTS_DIR / "build"
CONTRACT_NAMES = ("FederationRegistry", "ProvenanceLedger")


@dataclass(frozen=True)
class CompiledContract:
    name: str
    abi: list[dict[str, Any]]
    bytecode: str
    source_sha256: str
    vyper_version: str


def source_path(name: str) -> Path:
    if name not in CONTRACT_NAMES:
        raise ContractBuildError(f"unknown contract {name!r}; known: {CONTRACT_NAMES}")
    return CONTRACTS_DIR / f"{name}.vy"


def build_path(name: str) -> Path:
    return BUILD_DIR / f"{name}.json"


def _vyper_version() -> str:
    import vyper

    return str(vyper.__version__)


def compile_contract(name: str) -> CompiledContract:
    """Compile from source now (no cache)."""
    import vyper.compiler

    source_bytes = source_path(name).read_bytes()
    source = source_bytes.decode("utf-8")
    try:
        output = vyper.compiler.compile_code(source, output_formats=["abi", "bytecode"])
    except Exception as error:  # vyper raises many exception types; report them all the same way
        raise ContractBuildError(f"{source_path(name)} does not compile with vyper {_vyper_version()}: {error}") from error
    return CompiledContract(
        name=name,
        abi=output["abi"],
        bytecode=output["bytecode"],
        source_sha256=hashlib.sha256(source_bytes).hexdigest(),
        vyper_version=_vyper_version(),
    )


def _read_cache(name: str) -> CompiledContract | None:
    try:
        record = json.loads(build_path(name).read_text(encoding="utf-8"))
        return CompiledContract(**record)
    except (OSError, ValueError, TypeError):
        return None


def _write_cache(compiled: CompiledContract) -> None:
    record = json.dumps(compiled.__dict__, indent=1, sort_keys=True) + "\n"
    try:
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=BUILD_DIR, prefix=".tmp-")
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(record)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, build_path(compiled.name))
    except OSError:
        pass  # read-only install: the fresh compile is still used in memory


@cache
def load_contract(name: str) -> CompiledContract:
    """The compiled contract, from the cache when it matches the source and vyper version."""
    source_sha256 = hashlib.sha256(source_path(name).read_bytes()).hexdigest()
    cached = _read_cache(name)
    if cached and cached.source_sha256 == source_sha256 and cached.vyper_version == _vyper_version():
        return cached
    compiled = compile_contract(name)
    _write_cache(compiled)
    return compiled
