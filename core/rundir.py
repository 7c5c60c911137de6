"""The run directory contract (ARCHITECTURE.md section 7), written atomically."""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .ids import ensure_id

SUMMARY_KEYS = ("run_id", "task", "rounds_completed", "sites", "final_metrics", "privacy", "crypto", "chain")


def json_safe(value: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


@contextmanager
def exclusive_lock(lock_path: Path | str) -> Iterator[None]:
    """Hold an exclusive cross-process `flock` on `lock_path` (created 0600) for a read-modify-write."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write `data` to `path` so a crash leaves either the old file or the new one, never half of either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


class RunDirectory:
    """`runs/<run-id>/`: config.yaml, metrics.jsonl, summary.json, report.md, checkpoints/, artifacts/."""

    def __init__(self, root: Path | str, run_id: str) -> None:
        self.run_id = ensure_id(run_id, key="run_id")  # a run id becomes a folder name: never `../x`
        self.path = Path(root) / run_id
        self.checkpoints = self.path / "checkpoints"
        self.artifacts = self.path / "artifacts"
        for folder in (self.path, self.checkpoints, self.artifacts):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    def write_config(self, config_yaml: str) -> None:
        atomic_write_text(self.path / "config.yaml", config_yaml)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One JSON line per round and phase, flushed to disk before the round is reported."""
        line = json.dumps(json_safe(record), sort_keys=True, allow_nan=False) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def write_summary(self, summary: dict[str, Any]) -> None:
        missing = [key for key in SUMMARY_KEYS if key not in summary]
        if missing:
            raise ValueError(f"summary.json is missing contract keys {missing}")
        atomic_write_text(self.summary_path, json.dumps(json_safe(summary), indent=2, sort_keys=True, allow_nan=False) + "\n")

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path.read_text(encoding="utf-8"))
