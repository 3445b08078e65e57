"""The seeded mutator: byte-level and protobuf field-level edits, each named in a log that reproduces the case."""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

INTS = (0, 1, 2, 3, 4, 7, 8, 63, 64, 65, 127, 128, 255, 256, 4096, 2**15, 2**16, 2**20, 2**31 - 1, 2**31,
        2**32 - 1, 2**32, 2**34, 2**53, 2**62, 2**63 - 1, -1, -2, -(2**31), -(2**63))
FLOATS = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1.5, -1.0, 1e-45, 65504.0, 65520.0, 1e15, 1e30, 3.4e38, 1e300)
TEXT = ("", "x", "[/x]", "[/bold]", "[bold red]boom[/]", "a" * 300, "\x00", "naïve ✓", "../../etc/passwd", "%s%n",
        "payload", "lora_A.weight")
# Little-endian words a finite check must catch (fp16 and fp32 NaN/Inf), and huge finite ones.
_SPECIAL_WORDS = {2: [struct.pack("<H", w) for w in (0x7E00, 0x7C00, 0xFC00, 0x7BFF)],
                  4: [struct.pack("<f", v) for v in (math.nan, math.inf, -math.inf, 3.4e38, -3.4e38)]}
_T = FieldDescriptor
_INT_RANGES = {**dict.fromkeys((_T.TYPE_INT32, _T.TYPE_SINT32, _T.TYPE_SFIXED32, _T.TYPE_ENUM), (-(2**31), 2**31 - 1)),
               **dict.fromkeys((_T.TYPE_UINT32, _T.TYPE_FIXED32), (0, 2**32 - 1)),
               **dict.fromkeys((_T.TYPE_INT64, _T.TYPE_SINT64, _T.TYPE_SFIXED64), (-(2**63), 2**63 - 1)),
               **dict.fromkeys((_T.TYPE_UINT64, _T.TYPE_FIXED64), (0, 2**64 - 1))}


class Mutator:
    """Seeded edits of bytes and protobuf messages; ``log`` names each edit made (what reproduces a case)."""

    def __init__(self, rng: np.random.Generator, max_bytes: int) -> None:
        self.rng, self.max_bytes, self.log = rng, max_bytes, []

    def pick(self, options: Any) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def blob(self, data: bytes) -> bytes:
        """One byte-level mutation of ``data`` (the result is at most ``max_bytes`` long)."""
        rng, buf, n = self.rng, bytearray(data), len(data)
        kind = self.pick(("flip", "truncate", "extend", "overwrite", "special", "duplicate", "empty", "garbage"))
        self.log.append(f"bytes:{kind}")
        if kind == "flip" and n:
            for bit in rng.integers(n * 8, size=int(rng.integers(1, 9))):
                buf[bit // 8] ^= 1 << int(bit % 8)
        elif kind == "truncate":
            buf = buf[: int(rng.integers(n + 1))]
        elif kind == "extend":
            buf += rng.bytes(int(rng.integers(1, 65)))
        elif kind in ("overwrite", "duplicate") and n:
            start = int(rng.integers(n))
            chunk = rng.bytes(int(rng.integers(1, 17))) if kind == "overwrite" else buf[start:start + 64]
            buf[start:start + (len(chunk) if kind == "overwrite" else 0)] = chunk
        elif kind == "special":
            buf = bytearray(self.special(data, self.pick((2, 4))))
        elif kind == "empty":
            buf = bytearray()
        elif kind == "garbage":
            buf = bytearray(rng.bytes(int(rng.integers(0, 513))))
        return bytes(buf[: self.max_bytes])

    def special(self, data: bytes, size: int) -> bytes:
        """``data`` with 1-3 aligned words of ``size`` bytes set to NaN, Inf or a huge value (length unchanged)."""
        buf, words = bytearray(data), len(data) // size
        for at in self.rng.integers(words, size=int(self.rng.integers(1, 4))) if words else ():
            buf[int(at) * size:int(at) * size + size] = self.pick(_SPECIAL_WORDS[size])
        return bytes(buf)

    def edit(self, root: Any) -> None:
        """One field-level edit anywhere in protobuf message ``root`` (present nested messages included)."""
        sites = list(_field_sites(root))
        parent, fd = sites[int(self.rng.integers(len(sites)))]
        self.log.append(f"field:{fd.full_name}")
        value = getattr(parent, fd.name)
        with contextlib.suppress(TypeError, ValueError):  # e.g. text protobuf cannot encode: nor can a sender
            if fd.is_repeated:
                self._edit_repeated(value, fd)
            elif fd.type == _T.TYPE_MESSAGE:  # on an unset oneof member this switches the payload's case
                parent.ClearField(fd.name) if self.chance(0.5) else value.SetInParent()
            else:
                setattr(parent, fd.name, self.scalar(fd, value))

    def _edit_repeated(self, values: Any, fd: FieldDescriptor) -> None:
        op = self.pick(("clear", "delete", "duplicate", "append", "replace"))
        if op == "clear" or (not len(values) and op in ("delete", "replace")):
            del values[:]
        elif op == "delete":
            del values[int(self.rng.integers(len(values)))]
        elif fd.type == _T.TYPE_MESSAGE:
            item = values.add()
            if op == "duplicate" and len(values) > 1:
                item.CopyFrom(values[int(self.rng.integers(len(values) - 1))])
        elif op == "replace":
            values[int(self.rng.integers(len(values)))] = self.scalar(fd, None)
        else:
            values.extend(values[:] if op == "duplicate" else [self.scalar(fd, None)])

    def scalar(self, fd: FieldDescriptor, current: Any) -> Any:
        """A value of the field's wire type: boundary ints, special floats, markup text or mutated bytes."""
        if fd.type == _T.TYPE_BOOL:
            return not current
        if fd.type in (_T.TYPE_FLOAT, _T.TYPE_DOUBLE):
            return self.pick(FLOATS)
        if fd.type == _T.TYPE_STRING:
            if self.chance(0.7) or not current:
                return self.pick(TEXT)
            return current[: int(self.rng.integers(len(current)))]
        if fd.type == _T.TYPE_BYTES:
            return self.blob(current or b"")
        low, high = _INT_RANGES[fd.type]
        if fd.type == _T.TYPE_ENUM:
            value = int(self.rng.integers(-1, 10))
        else:
            value = self.pick(INTS) if self.chance(0.7) else int(current or 0) + int(self.rng.integers(-3, 4))
        return low + (value - low) % (high - low + 1)  # wrapped into the field's range, as a sender's bytes would be


def _field_sites(message: Any) -> Iterator[tuple[Any, FieldDescriptor]]:
    for fd in message.DESCRIPTOR.fields:
        yield message, fd
        if fd.type == _T.TYPE_MESSAGE and fd.is_repeated:
            for item in getattr(message, fd.name):
                yield from _field_sites(item)
        elif fd.type == _T.TYPE_MESSAGE and message.HasField(fd.name):
            yield from _field_sites(getattr(message, fd.name))
