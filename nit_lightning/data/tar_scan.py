"""Member offsets of an uncompressed tar from its headers alone (random access to shards without tarfile)."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

BLOCK = 512  # tar blocks: a 512-byte header, then the data padded to a multiple of 512


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes ≥ 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def scan_tar(path: Path) -> list[tuple[str, int, int]]:
    """(member name, data offset, size) of the regular files of an uncompressed tar, from headers only.

    ~20× faster than tarfile on pax headers (which `ShardWriter` emits for float mtimes). A truncated tar ends the list
    early (logged); the members it lost are reported per sample by `shards.ShardReader.read`."""
    out: list[tuple[str, int, int]] = []
    pending_name: str | None = None  # from a pax 'path' record or a GNU long name, applies to the next member
    position = 0
    with open(path, "rb") as handle:
        while True:
            header = handle.read(BLOCK)
            if len(header) < BLOCK or header == bytes(BLOCK):
                if 0 < len(header) < BLOCK:
                    log.warning("shard %s is truncated inside a header after %d members", path, len(out))
                break
            if sum(header[:148]) + sum(header[156:]) + 8 * 32 != _octal(header[148:156]):
                log.warning("shard %s has a corrupt header at byte %d after %d members", path, position, len(out))
                break
            size, kind = _octal(header[124:136]), header[156:157]
            data_offset = position + BLOCK
            if kind in (b"x", b"L"):
                payload = handle.read(size)
                if kind == b"L":
                    pending_name = payload.split(b"\0", 1)[0].decode()
                else:
                    for record in payload.decode().split("\n"):
                        _, _, item = record.partition(" ")
                        if item.startswith("path="):
                            pending_name = item[len("path=") :]
            elif kind in (b"0", b"\0", b"7"):
                name = header[:100].split(b"\0", 1)[0].decode()
                prefix = header[345:500].split(b"\0", 1)[0].decode()
                name = pending_name or (f"{prefix}/{name}" if prefix else name)
                out.append((name, data_offset, size))
                pending_name = None
            elif kind != b"g":
                pending_name = None
            position = data_offset + -(-size // BLOCK) * BLOCK
            handle.seek(position)
    return out
