"""Parquet page CRCs checked from a memory-mapped file, for the reader (`pipeline.dataset`).

Every page our writer stores carries a CRC-32 of its bytes as written (docs/format.md). pyarrow verifies them
while it decodes (`page_checksum_verification=True`) with a table-driven CRC that ran at about a third of the
speed of the rest of decoding a row group (docs/benchmarks.md, "The loader"); ISA-L's CRC-32 (`isal`, the same
polynomial as zlib's) runs several times faster. So for local files the reader walks the page headers of each
column chunk it is about to decode, checks each page's CRC here, and lets pyarrow decode without checking again.
pyarrow does not expose page headers, hence the small Thrift compact-protocol reader below: it reads the four
leading fields of a PageHeader (type, sizes, crc) and skips the rest.
TODO(https://github.com/apache/arrow/blob/main/cpp/src/arrow/util/crc32.cc): drop this once Arrow's CRC-32 (slicing-by-16
tables there) is as fast as ISA-L's.

A page without a CRC is passed, as pyarrow passes it. Anything that does not parse as pages filling the chunk
exactly is reported as damaged.
"""
from __future__ import annotations

import zlib

try:  # ISA-L: same CRC-32 as zlib's, several times faster; zlib's serves (same results) where it is missing
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; kept for platforms without its wheel
    crc32 = zlib.crc32

__all__ = ["DamagedPage", "check_column_chunk", "pages"]

# Thrift compact-protocol type codes (https://github.com/apache/thrift/blob/master/doc/specs/thrift-compact-protocol.md)
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)
# PageHeader field ids (parquet.thrift)
_COMPRESSED_PAGE_SIZE, _CRC = 3, 4


class DamagedPage(OSError):
    """A page whose bytes do not match its CRC, or a column chunk that does not parse as pages."""


class _Reader:
    def __init__(self, data: memoryview, position: int, end: int):
        self.data, self.position, self.end = data, position, end

    def byte(self) -> int:
        if self.position >= self.end:
            raise DamagedPage(f"a page header runs past the column chunk's end (byte {self.end})")
        value = self.data[self.position]
        self.position += 1
        return value

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise DamagedPage(f"varint longer than 10 bytes at byte {self.position}")

    def zigzag(self) -> int:
        value = self.varint()
        return (value >> 1) ^ -(value & 1)

    def skip(self, kind: int, depth: int = 0) -> None:
        if depth > 32:
            raise DamagedPage("page header nested too deeply")
        if kind in (_TRUE, _FALSE):
            return
        if kind == _BYTE:
            self.byte()
        elif kind in (_I16, _I32, _I64):
            self.varint()
        elif kind == _DOUBLE:
            self.advance(8)
        elif kind == _BINARY:
            self.advance(self.varint())
        elif kind in (_LIST, _SET):
            header = self.byte()
            size, element = header >> 4, header & 0x0F
            if size == 15:
                size = self.varint()
            for _ in range(size):
                self.byte() if element in (_TRUE, _FALSE) else self.skip(element, depth + 1)
        elif kind == _MAP:
            size = self.varint()
            if size:
                types = self.byte()
                for _ in range(size):
                    self.skip(types >> 4, depth + 1)
                    self.skip(types & 0x0F, depth + 1)
        elif kind == _STRUCT:
            self.struct(lambda field, kind: self.skip(kind, depth + 1))
        else:
            raise DamagedPage(f"unknown Thrift type {kind} at byte {self.position}")

    def advance(self, count: int) -> None:
        if count < 0 or self.position + count > self.end:
            raise DamagedPage(f"page header runs past the column chunk's end (byte {self.end})")
        self.position += count

    def struct(self, field) -> None:
        """Calls field(id, type) for each field of a struct; `field` must consume the field's value."""
        last = 0
        while True:
            header = self.byte()
            if header == 0:
                return
            kind, delta = header & 0x0F, header >> 4
            last = last + delta if delta else self.zigzag()
            field(last, kind)


def pages(chunk: memoryview):
    """(offset of the page's bytes, their length, stored CRC or None) for each page of a column chunk's bytes."""
    position, end = 0, len(chunk)
    while position < end:
        reader = _Reader(chunk, position, end)
        found = {}

        def field(number, kind):
            if number in (_COMPRESSED_PAGE_SIZE, _CRC) and kind == _I32:
                found[number] = reader.zigzag()
            else:
                reader.skip(kind)

        reader.struct(field)
        size = found.get(_COMPRESSED_PAGE_SIZE)
        if size is None or size < 0 or reader.position + size > end:
            raise DamagedPage(f"page header at byte {position} of the column chunk gives no valid size "
                              f"(compressed_page_size={size}, the chunk has {end} bytes)")
        yield reader.position, size, found.get(_CRC)
        position = reader.position + size


def check_column_chunk(chunk: memoryview, name: str, file_offset: int = 0) -> int:
    """Checks every page of a column chunk's bytes (`name` and `file_offset`, where the chunk starts in its file,
    are for messages); returns the number of pages. DamagedPage names the first page that fails."""
    count = 0
    try:
        for offset, size, stored in pages(chunk):
            if stored is not None:
                computed = crc32(chunk[offset:offset + size]) & 0xFFFFFFFF
                if computed != stored & 0xFFFFFFFF:
                    raise DamagedPage(f"column {name}, page at byte {file_offset + offset}: CRC checksum "
                                      f"verification failed (stored {stored & 0xFFFFFFFF:#010x}, computed "
                                      f"{computed:#010x})")
            count += 1
    except DamagedPage as damaged:
        if str(damaged).startswith("column "):
            raise
        raise DamagedPage(f"column {name} (chunk at byte {file_offset}): {damaged}") from None
    return count
