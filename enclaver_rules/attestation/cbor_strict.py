"""Strict decoding of exactly one CBOR item (RFC 8949) from hostile bytes: enclaver's one CBOR reader.

Hand-written, not cbor2: cbor2 turns semantic tags in hostile bytes into Python objects (regular
expressions, MIME messages, cyclic shared references, sets, dates, decimals) and cannot be told not to.

The subset read: integers (major types 0 and 1, with any head size: a non-minimal head is still
well-formed, RFC 8949 §4.1 leaves the shortest form to the encoder), byte and text strings
(definite, or indefinite as definite chunks of the same major type; text is UTF-8, checked chunk by
chunk as §3.2.3 requires), arrays and maps (definite or indefinite), false, true and null. A tag is
read only if the caller allows its number, and only outside every array and map (a tag around the
whole item, like COSE's 18); it comes back as `Tagged`. A map key is a scalar (integer, text, bytes,
bool or null), and no key may equal another.

Refused with `CborError` (which names the offset and, inside maps and arrays, the path to the
item): floats, undefined and other simple values, any other tag (`TagNotAllowed`, with its number),
a repeated key (`DuplicateKey`), nesting deeper than `max_depth` (arrays, maps and tags each count),
a string longer or a container with more items than there are bytes left (refused before anything is
allocated, so memory stays proportional to the input), a break out of place, trailing bytes.

Values are plain: int, bool, None, bytes, str, list, dict (keys in wire order) and `Tagged`.
Pure and standard library only: odyn's static binary stages this module (through `nsm_messages`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

BREAK = 0xFF
_SIMPLE = {20: False, 21: True, 22: None}
_KINDS = {4: "an array", 5: "a map", 6: "a tag"}
Key = int | str | bytes | bool | None


@dataclass(frozen=True, slots=True)
class Tagged:
    """A tag the caller allowed, around its item."""

    tag: int
    value: Any


class CborError(ValueError):
    """The bytes are not exactly one item of the subset. `offset` is where the offending head starts,
    `path` the map keys and array indices from the outermost item down to it."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.path: list[Key] = []

    def __str__(self) -> str:
        where = f" (in {_format_path(self.path)})" if self.path else ""
        return f"{self.message} at offset {self.offset}{where}"


class TagNotAllowed(CborError):
    """A tag whose number the caller did not allow (or any tag inside an array or map)."""

    def __init__(self, tag: int, offset: int, allowed: str) -> None:
        super().__init__(f"CBOR tag {tag} (allowed tags: {allowed})", offset)
        self.tag = tag


class DuplicateKey(CborError):
    """A map key equal to an earlier key of the same map."""

    def __init__(self, key: Key, earlier: Key, offset: int) -> None:
        same = type(key) is type(earlier)
        super().__init__(f"the map key {key!r:.40} appears twice" if same else
                         f"the map keys {earlier!r:.40} and {key!r:.40} are one key to Python", offset)
        self.key = key


def decode(data: bytes | bytearray | memoryview, *, max_depth: int, tags: Collection[int] = ()) -> Any:
    """The one item `data` holds, with no byte left over; CborError otherwise.

    `max_depth` bounds nesting (each array, map and tag is one level; 1 allows `[0]` but not
    `[[0]]`), and with it the recursion. `tags` are the tag numbers allowed around the whole item."""
    reader = _Reader(memoryview(data).cast("B"), max_depth, frozenset(tags))
    value = reader.item(0, nested=False)
    left = len(reader.data) - reader.pos
    if left:
        raise CborError(f"{left} trailing byte{'s' if left > 1 else ''} after the item", reader.pos)
    return value


class _Reader:
    __slots__ = ("data", "max_depth", "pos", "tags")

    def __init__(self, data: memoryview, max_depth: int, tags: frozenset[int]) -> None:
        self.data, self.max_depth, self.tags, self.pos = data, max_depth, tags, 0

    def head(self) -> tuple[int, int, int | None]:
        """(major type, additional information, argument or None for indefinite); moves past the head."""
        data, pos = self.data, self.pos
        if pos >= len(data):
            raise CborError("truncated", pos)
        initial = data[pos]
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            self.pos = pos + 1
            return major, info, info
        if info <= 27:
            size = 1 << (info - 24)
            if pos + 1 + size > len(data):
                raise CborError("truncated", pos)
            self.pos = pos + 1 + size
            return major, info, int.from_bytes(data[pos + 1:pos + 1 + size], "big")
        if info == 31 and major in (2, 3, 4, 5):
            self.pos = pos + 1
            return major, info, None
        if initial == BREAK:
            raise CborError("a break (0xff) outside an indefinite-length item", pos)
        raise CborError(f"reserved or invalid initial byte 0x{initial:02x}", pos)

    def item(self, depth: int, *, nested: bool) -> Any:
        start = self.pos
        major, info, arg = self.head()
        if major == 0:
            return arg
        if major == 1:
            assert arg is not None
            return -1 - arg
        if major in (2, 3):
            return self.string(major, arg, start)
        if major == 7:
            if info in _SIMPLE:
                return _SIMPLE[info]
            what = {23: "undefined", 25: "a float", 26: "a float", 27: "a float"}.get(info, "a simple value")
            raise CborError(f"{what} (0x{self.data[start]:02x}) is not allowed", start)
        if major == 6 and (nested or arg not in self.tags):
            assert arg is not None
            allowed = "none inside an array or map" if nested else " or ".join(["none", *map(str, sorted(self.tags))])
            raise TagNotAllowed(arg, start, allowed)
        if depth >= self.max_depth:
            raise CborError(f"nested deeper than {self.max_depth}", start)
        if major == 6:
            assert arg is not None
            return Tagged(arg, self.item(depth + 1, nested=False))
        if major == 4:
            return self.array(arg, depth, start)
        return self.map(arg, depth, start)

    def take(self, size: int, start: int) -> bytes:
        """`size` bytes from the current position, checked against what is left before copying."""
        pos = self.pos
        if size > len(self.data) - pos:
            raise CborError(f"a string of {size} bytes runs past the end", start)
        self.pos = pos + size
        return bytes(self.data[pos:pos + size])

    def string(self, major: int, size: int | None, start: int) -> bytes | str:
        if size is not None:
            return self.text(self.take(size, start), start) if major == 3 else self.take(size, start)
        chunks: list[Any] = []
        while not self.at_break(start):
            chunk_start = self.pos
            chunk_major, _, chunk_size = self.head()
            if chunk_major != major or chunk_size is None:
                raise CborError("a chunk of an indefinite-length string is not a definite string of its type",
                                chunk_start)
            chunk = self.take(chunk_size, chunk_start)
            chunks.append(self.text(chunk, chunk_start) if major == 3 else chunk)
        return "".join(chunks) if major == 3 else b"".join(chunks)

    @staticmethod
    def text(raw: bytes, start: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CborError("a text string is not UTF-8", start) from None

    def at_break(self, start: int) -> bool:
        """Whether an indefinite-length item ends here (the break is consumed)."""
        if self.pos >= len(self.data):
            raise CborError("an indefinite-length item has no break", start)
        if self.data[self.pos] == BREAK:
            self.pos += 1
            return True
        return False

    def more(self, count: int | None, seen: int, width: int, start: int) -> bool:
        """Whether the container starting at `start` has another entry of at least `width` bytes."""
        if count is None:
            return not self.at_break(start)
        if seen == 0 and count * width > len(self.data) - self.pos:
            raise CborError(f"a container claims {count} items: more items than there are bytes left", start)
        return seen < count

    def array(self, count: int | None, depth: int, start: int) -> list[Any]:
        items: list[Any] = []
        while self.more(count, len(items), 1, start):
            try:
                items.append(self.item(depth + 1, nested=True))
            except CborError as e:
                e.path.insert(0, len(items))
                raise
        return items

    def map(self, count: int | None, depth: int, start: int) -> dict[Key, Any]:
        entries: dict[Key, Any] = {}
        while self.more(count, len(entries), 2, start):
            key_start = self.pos
            major = self.data[key_start] >> 5 if key_start < len(self.data) else 0  # 0: item() says truncated
            if major in _KINDS:
                raise CborError(f"a map key must be an integer, a string, a bool or null, not {_KINDS[major]}",
                                key_start)
            key = self.item(depth + 1, nested=True)
            if key in entries:
                raise DuplicateKey(key, next(k for k in entries if k == key), key_start)
            try:
                entries[key] = self.item(depth + 1, nested=True)
            except CborError as e:
                e.path.insert(0, key)
                raise
        return entries


def _format_path(path: list[Key]) -> str:
    """``pcrs[3]``, ``DescribePCR.index``: text keys that are names dotted, anything else in brackets."""
    out = ""
    for step in path:
        if isinstance(step, str) and step.isidentifier() and len(step) <= 40:
            out += f".{step}" if out else step
        else:
            out += f"[{step!r:.40}]"
    return out
