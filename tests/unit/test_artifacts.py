"""core.artifacts: content-addressed store, atomic private files, corruption detection."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from medtwin.core.artifacts import (
    ArtifactCorruptedError,
    ArtifactError,
    ArtifactNotFoundError,
    ArtifactStore,
)


def test_put_files_bytes_under_their_sha256(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    digest = store.put(b"ciphertext", kind="update")
    assert digest == hashlib.sha256(b"ciphertext").hexdigest()
    path = tmp_path / digest[:2] / digest
    assert path.read_bytes() == b"ciphertext"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.get(digest) == b"ciphertext"
    assert store.exists(digest) and store.kinds() == {digest: "update"}
    assert not list(path.parent.glob(".tmp-*")), "no temp file may be left behind"


def test_put_is_idempotent(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert store.put(b"x", kind="update") == store.put(b"x", kind="update")
    assert list(store.digests()) == [hashlib.sha256(b"x").hexdigest()]


def test_altering_one_byte_is_detected_on_read_and_by_verify_all(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    digest = store.put(b"update-bytes", kind="update")
    intact = store.put(b"other", kind="aggregate")
    path = store.path(digest)
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorruptedError) as caught:
        store.get(digest)
    assert caught.value.digest == digest and caught.value.actual == hashlib.sha256(bytes(data)).hexdigest()
    assert str(path) in str(caught.value)
    problems = store.verify_all()
    assert [problem.digest for problem in problems] == [digest]
    assert store.get(intact) == b"other"


def test_put_repairs_a_corrupted_copy(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    digest = store.put(b"payload", kind="update")
    store.path(digest).write_bytes(b"garbage")
    assert store.put(b"payload", kind="update") == digest
    assert store.get(digest) == b"payload"


def test_missing_and_malformed_ids(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(ArtifactNotFoundError):
        store.get("ab" * 32)
    with pytest.raises(ArtifactError, match="not a sha256"):
        store.get("../etc/passwd")
    with pytest.raises(ArtifactError, match="kind"):
        store.put(b"x", kind="Bad Kind!")


def test_verify_all_reports_a_deleted_blob(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    digest = store.put(b"gone soon", kind="update")
    store.path(digest).unlink()
    assert [(problem.digest, "missing" in problem.problem) for problem in store.verify_all()] == [(digest, True)]
