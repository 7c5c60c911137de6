"""Bytes in and out of SEAL objects through `tenseal.sealapi`, which only saves to and loads from a path.

SEAL's `save` writes its own format (a 16-byte header, then the object compressed with zstd); a
`Serializable` ciphertext from `Encryptor.encrypt_symmetric` is written in seeded form. On Linux
the path is an anonymous in-memory file (`memfd_create`), so nothing — a secret key included —
touches a file system; elsewhere it is a file in a private (0700) temporary folder, removed at once.

Bytes from a peer never reach SEAL's own zstd inflater: on a compressed object that inflates shorter
than its members say, SEAL 4.1 throws from a noexcept destructor and the process aborts — one signed
chunk from a hostile site would kill the coordinator. `seal_load(..., max_object_bytes=...)` inflates
here instead (the `zstandard` package, output capped), rewrites SEAL's header as uncompressed, and
SEAL's uncompressed reader refuses a short object with an ordinary exception.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import zstandard

# SEAL's serialization header: magic, header size, version major, minor, compression mode, reserved, total size
SEAL_HEADER = struct.Struct("<HBBBBHQ")
SEAL_MAGIC = 0xA15E
COMPRESSION_NONE, COMPRESSION_ZSTD = 0, 2


class Saveable(Protocol):
    def save(self, path: str, /) -> None: ...


def seal_bytes(item: Saveable) -> bytes:
    """What SEAL's `item.save(path)` writes, as bytes."""
    with _scratch_path() as path:
        item.save(path)
        with open(path, "rb") as handle:
            return handle.read()


def seal_load(load: Callable[[str], None], data: bytes, *, max_object_bytes: int | None = None) -> None:
    """Call SEAL's `load(path)` on `data` (e.g. `lambda path: ciphertext.load(context, path)`).
    Bytes from a peer pass `max_object_bytes` (the object's largest uncompressed size): they are
    inflated here, never by SEAL; `ValueError` if they are not a SEAL object within that size."""
    if max_object_bytes is not None:
        data = inflate_untrusted(data, max_object_bytes=max_object_bytes)
    with _scratch_path() as path:
        with open(path, "wb") as handle:
            handle.write(data)
        load(path)


@contextmanager
def seal_loader() -> Iterator[Callable[[Callable[[str], None], bytes], None]]:
    """`seal_load` without `max_object_bytes` for many objects in a row, through one scratch file
    (rewritten for each): `with seal_loader() as load: load(lambda path: ..., data)`."""
    with _scratch_path() as path:

        def load(seal_load_from: Callable[[str], None], data: bytes) -> None:
            with open(path, "wb") as handle:  # truncates what the previous object left
                handle.write(data)
            seal_load_from(path)

        yield load


def inflate_untrusted(data: bytes, *, max_object_bytes: int) -> bytes:
    """The same SEAL object, uncompressed: header checked, zstd inflated with its output capped."""
    if len(data) < SEAL_HEADER.size:
        raise ValueError(f"{len(data)} bytes is shorter than SEAL's {SEAL_HEADER.size}-byte header")
    magic, header_size, major, minor, mode, _, size = SEAL_HEADER.unpack_from(data)
    if (magic, header_size, size) != (SEAL_MAGIC, SEAL_HEADER.size, len(data)):
        raise ValueError(f"not one SEAL object: magic {magic:#x}, header size {header_size}, declared size {size} of {len(data)} bytes")
    if mode == COMPRESSION_NONE:
        body = data[SEAL_HEADER.size :]
    elif mode == COMPRESSION_ZSTD:
        try:
            body = _inflate_capped(data[SEAL_HEADER.size :], max_object_bytes + 1)
        except zstandard.ZstdError as error:
            raise ValueError(f"SEAL object's zstd body does not inflate ({error})") from None
    else:
        raise ValueError(f"SEAL compression mode {mode} (only none or zstd are accepted)")
    if len(body) > max_object_bytes:
        raise ValueError(f"SEAL object inflates past {max_object_bytes} bytes, the most these parameters produce")
    return SEAL_HEADER.pack(magic, SEAL_HEADER.size, major, minor, COMPRESSION_NONE, 0, SEAL_HEADER.size + len(body)) + body


def _inflate_capped(compressed: bytes, limit: int) -> bytes:
    """At most `limit` bytes of the zstd stream's output (a bomb stops there)."""
    pieces, total = [], 0
    with zstandard.ZstdDecompressor().stream_reader(compressed) as reader:
        while total < limit and (piece := reader.read(min(1 << 16, limit - total))):
            pieces.append(piece)
            total += len(piece)
    return b"".join(pieces)


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
