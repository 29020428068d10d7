"""The pack format: many small objects in one file, so that storing a tree of thousands of
small files costs one file, not thousands. This module owns the layout; the store decides
what goes into packs and where they live (agent/store.py).

A pack is the objects' bytes back to back, then an index, then a footer:

    body    object bytes, concatenated
    index   msgpack array of [id (32 bytes), offset, size], sorted by id
    footer  8 bytes: the index's length, big-endian; then MAGIC (8 bytes)

A pack is named by the SHA-256 of its index (`<64 hex>.pack`): the index names every object
and where it lies, so two packs with one name hold the same objects in the same places. The
objects themselves are named by their own hashes, verified before a pack is written and again
by fsck. Nothing here does I/O beyond the descriptor it is given.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable

import msgpack

from agent.protocol.objects import ID_HEX_LEN

MAGIC = b"LPACK\x00v1"
FOOTER = struct.Struct(">Q8s")
SUFFIX = ".pack"
MAX_INDEX = 256 * 2**20  # an index larger than this is not one we wrote
ID_BYTES = ID_HEX_LEN // 2


class CorruptPack(ValueError):
    """A pack whose footer or index does not hold together."""


def build(
    objects: Iterable[tuple[str, bytes]],
) -> tuple[list[bytes], list[tuple[str, int, int]], str]:
    """(the pack's pieces, to be written in order; its index; its name) for `objects`, whose
    ids the caller has verified."""
    pieces: list[bytes] = []
    index: list[tuple[str, int, int]] = []
    offset = 0
    for object_id, data in sorted(objects):
        pieces.append(data)
        index.append((object_id, offset, len(data)))
        offset += len(data)
    encoded: bytes = msgpack.packb([(bytes.fromhex(i), o, n) for i, o, n in index])
    pieces.append(encoded)
    pieces.append(FOOTER.pack(len(encoded), MAGIC))
    return pieces, index, hashlib.sha256(encoded).hexdigest() + SUFFIX


def read_index(fd: int) -> tuple[list[tuple[str, int, int]], str]:
    """The (id, offset, size) entries of the pack open at `fd`, and the name it should have.
    CorruptPack if the footer or the index is not what `build` writes."""
    end = os.fstat(fd).st_size
    if end < FOOTER.size:
        raise CorruptPack("shorter than its footer")
    length, magic = FOOTER.unpack(os.pread(fd, FOOTER.size, end - FOOTER.size))
    body = end - FOOTER.size - length
    if magic != MAGIC or length > MAX_INDEX or body < 0:
        raise CorruptPack("no pack footer")
    encoded = os.pread(fd, length, body)
    try:
        raw = msgpack.unpackb(encoded, use_list=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptPack(f"unreadable index: {exc}") from None
    if not isinstance(raw, list):
        raise CorruptPack("the index is not a list")
    entries: list[tuple[str, int, int]] = []
    for item in raw:
        try:
            raw_id, offset, size = item
        except (ValueError, TypeError):
            raise CorruptPack(f"bad index entry {item!r:.100}") from None
        if not (
            type(raw_id) is bytes
            and len(raw_id) == ID_BYTES
            and type(offset) is int
            and type(size) is int
            and 0 <= offset <= offset + size <= body
        ):
            raise CorruptPack(f"bad index entry {item!r:.100}")
        entries.append((raw_id.hex(), offset, size))
    return entries, hashlib.sha256(encoded).hexdigest() + SUFFIX


def read_object(fd: int, offset: int, size: int) -> bytes:
    """The `size` bytes at `offset` of a pack; CorruptPack if the file ends before."""
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise CorruptPack(f"ends inside the object at {offset}")
    return data
