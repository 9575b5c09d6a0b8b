"""HTTP ``Range`` requests (RFC 9110) on blobs: which bytes a header asks for. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes ``[start, end)`` of a blob of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end - 1}/{self.size}"


class RangeNotSatisfiable(Exception):
    """A syntactically valid range that selects no byte of the blob (HTTP 416)."""


_RANGE: Final = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range a ``Range`` header asks for, or None for the whole blob.

    Malformed headers, other units and multiple ranges are ignored (None), as RFC 9110
    allows; a valid range that starts past the end raises :class:`RangeNotSatisfiable`.
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable(f"suffix range of {length} bytes of a {size}-byte blob")
        return ByteRange(max(0, size - length), size, size)
    start = int(first)
    if last and int(last) < start:
        return None  # a-b with b < a is invalid syntax: ignored
    end = int(last) + 1 if last else size
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at byte {start} of a {size}-byte blob")
    return ByteRange(start, min(end, size), size)
