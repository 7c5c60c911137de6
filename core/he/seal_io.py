"""Bytes in and out of SEAL objects through `tenseal.sealapi`, which only saves to and loads from a path.

SEAL's `save` writes its own format (a 16-byte header, then the object compressed with zstd); a
`Serializable` ciphertext from `Encryptor.encrypt_symmetric` is written in seeded form. On Linux
the path is an anonymous in-memory file (`memfd_create`), so nothing — a secret key included —
touches a file system; elsewhere it is a file in a private (0700) temporary folder, removed at once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol


class Saveable(Protocol):
    def save(self, path: str, /) -> None: ...


def seal_bytes(item: Saveable) -> bytes:
    """What SEAL's `item.save(path)` writes, as bytes."""
    with _scratch_path() as path:
        item.save(path)
        with open(path, "rb") as handle:
            return handle.read()


def seal_load(load: Callable[[str], None], data: bytes) -> None:
    """Call SEAL's `load(path)` on `data` (e.g. `lambda path: ciphertext.load(context, path)`)."""
    with _scratch_path() as path:
        with open(path, "wb") as handle:
            handle.write(data)
        load(path)


@contextmanager
def _scratch_path() -> Iterator[str]:
    if hasattr(os, "memfd_create"):
        descriptor = os.memfd_create("medtwin-seal", os.MFD_CLOEXEC)
        try:
            yield f"/proc/self/fd/{descriptor}"
        finally:
            os.close(descriptor)
        return
    with tempfile.TemporaryDirectory(prefix="medtwin-seal-") as folder:  # created 0700
        yield os.path.join(folder, "object")
