"""Content-addressed artifact store: bytes are filed under their sha256 and checked on every read.

Layout: ``<root>/<sha[:2]>/<sha>`` (the file's bytes hash to its name) plus ``<root>/index.jsonl``,
an append-only log of (sha256, kind, size) lines that tells what each blob is. Writes are atomic
(temp file in the same folder, fsync, rename) and files are private (0600). The chains hold only
these digests; an auditor re-reads the blobs and recomputes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import MedtwinError
from .rundir import atomic_write_bytes

__all__ = [
    "ArtifactCorruptedError",
    "ArtifactError",
    "ArtifactNotFoundError",
    "ArtifactProblem",
    "ArtifactStore",
    "read_file",
    "sha256_hex",
]

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_KIND = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
FILE_MODE = 0o600
INDEX_NAME = "index.jsonl"


class ArtifactError(MedtwinError):
    """Base class of artifact-store errors."""


def _chunks(path: Path, chunk: int = 1 << 20, *, max_bytes: int | None = None) -> Iterator[bytes]:
    """A file's bytes in chunks, exactly as many as its size says: a directory, a device, an unreadable file, a
    file larger than `max_bytes`, or a "file" that yields more than its size (a /proc file: /proc/self/pagemap
    would stream ~256 GB) is an ArtifactError naming it, not a hang or a crash."""
    if not path.is_file():
        raise ArtifactError(f"{path} is not a regular file")
    try:
        with path.open("rb") as handle:
            left = os.fstat(handle.fileno()).st_size
            if max_bytes is not None and left > max_bytes:
                raise ArtifactError(f"{path} is {left} bytes, more than the {max_bytes} this reader accepts")
            while left > 0:
                data = handle.read(min(chunk, left))
                if not data:
                    raise ArtifactError(f"{path} ended {left} bytes before its size (it changed while read)")
                left -= len(data)
                yield data
            if handle.read(1):
                raise ArtifactError(f"{path} holds more than its size says: not a regular file")
    except OSError as error:
        raise ArtifactError(f"{path} cannot be read ({error.strerror or error})") from None


def read_file(path: Path, *, max_bytes: int | None = None) -> bytes:
    """A file's bytes, read as `_chunks` does: for files someone else controls (an auditor's view of a coordinator's)."""
    return b"".join(_chunks(path, max_bytes=max_bytes))


class ArtifactNotFoundError(ArtifactError):
    def __init__(self, digest: str, path: Path) -> None:
        self.digest = digest
        super().__init__(f"artifact {digest} not found at {path} — was it stored in another artifact root?")


class ArtifactCorruptedError(ArtifactError):
    """The bytes on disk no longer hash to the name they were filed under."""

    def __init__(self, digest: str, path: Path, actual: str) -> None:
        self.digest, self.path, self.actual = digest, path, actual
        super().__init__(
            f"artifact {path} is corrupted: expected sha256 {digest}, the file hashes to {actual} — "
            "restore it from a backup; the on-chain digest is the reference"
        )


@dataclass(frozen=True)
class ArtifactProblem:
    digest: str
    path: str
    problem: str


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_digest(digest: str) -> str:
    normalized = digest.lower().removeprefix("0x")
    if not _DIGEST.match(normalized):
        raise ArtifactError(f"artifact id {digest!r} is not a sha256 hex digest (64 hex characters)")
    return normalized


class ArtifactStore:
    """A folder of immutable blobs named by their sha256."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        normalized = _check_digest(digest)
        return self.root / normalized[:2] / normalized

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put(self, data: bytes, *, kind: str) -> str:
        """Store `data` (idempotent) and return its sha256 hex; repairs a corrupted copy."""
        if not _KIND.match(kind):
            raise ArtifactError(f"artifact kind {kind!r} must be lowercase letters, digits, '_', '.', '-' (max 64)")
        digest = sha256_hex(data)
        target = self.path(digest)
        if target.is_file() and sha256_hex(target.read_bytes()) == digest:
            return digest
        atomic_write_bytes(target, data, mode=FILE_MODE)
        self._append_index({"sha256": digest, "kind": kind, "size": len(data)})
        return digest

    def get(self, digest: str, *, max_bytes: int | None = None) -> bytes:
        """The bytes filed under `digest`; raises ArtifactCorruptedError if they no longer match (and an ArtifactError
        if the file is larger than `max_bytes`)."""
        normalized = _check_digest(digest)
        target = self._existing(normalized)
        data = read_file(target, max_bytes=max_bytes)
        actual = sha256_hex(data)
        if actual != normalized:
            raise ArtifactCorruptedError(normalized, target, actual)
        return data

    def read_unverified(self, digest: str, *, max_bytes: int | None = None) -> bytes:
        """Raw bytes without the hash check (for auditors who recompute digests themselves); an ArtifactError if the
        file is larger than `max_bytes` (what an auditor parses is small: a coordinator's 3 GB file is refused)."""
        return read_file(self._existing(digest), max_bytes=max_bytes)

    def hash_unverified(self, digest: str) -> str:
        """The sha256 of what is filed under `digest`, read in chunks (an artifact of any size, in constant memory)."""
        hasher = hashlib.sha256()
        for chunk in _chunks(self._existing(digest)):
            hasher.update(chunk)
        return hasher.hexdigest()

    def _existing(self, digest: str) -> Path:
        """The file filed under `digest`; ArtifactNotFoundError if there is none."""
        target = self.path(digest)
        if not target.is_file():
            raise ArtifactNotFoundError(_check_digest(digest), target)
        return target

    def digests(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and len(folder.name) == 2:
                for blob in sorted(folder.iterdir()):
                    if _DIGEST.match(blob.name):
                        yield blob.name

    def kinds(self) -> dict[str, str]:
        """sha256 -> kind, from the index (last entry wins); ArtifactError naming the line if it is not one this
        store writes (an auditor reads a coordinator's index: whatever is in it is reported, not a crash)."""
        index = self.root / INDEX_NAME
        if not index.exists():
            return {}
        kinds: dict[str, str] = {}
        try:
            lines = read_file(index).decode("utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise ArtifactError(f"artifact index {index} is not UTF-8 text ({error})") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError) as error:
                raise ArtifactError(f"artifact index {index} line {number} is not JSON ({type(error).__name__})") from None
            if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("kind"), str)):
                raise ArtifactError(f"artifact index {index} line {number} is not an index entry (sha256, kind)")
            kinds[entry["sha256"]] = entry["kind"]
        return kinds

    def verify_all(self) -> list[ArtifactProblem]:
        """Re-hash every blob; an empty list means the store is intact."""
        problems = []
        for digest in self.digests():
            target = self.path(digest)
            actual = sha256_hex(target.read_bytes())
            if actual != digest:
                problems.append(ArtifactProblem(digest, str(target), f"content hashes to {actual}"))
        for digest in self.kinds():
            if not self.exists(digest):
                problems.append(ArtifactProblem(digest, str(self.path(digest)), "listed in the index but missing"))
        return problems

    def _append_index(self, entry: dict[str, object]) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        descriptor = os.open(self.root / INDEX_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            os.write(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
