"""The pages of a Parquet column chunk in a memory-mapped file, read by the reader (`pipeline.dataset`) without
pyarrow's page decoder, for two things pyarrow does more slowly:

- **Page CRCs.** Every page our writer stores carries a CRC-32 of its bytes as written (docs/format.md). pyarrow
  verifies them while it decodes (`page_checksum_verification=True`) with a table-driven CRC that took about as
  long as the rest of decoding a row group (docs/benchmarks.md, "The loader"); ISA-L's CRC-32 (`isal`, the same
  polynomial as zlib's) runs several times faster.
- **Vectors in place.** An uncompressed, PLAIN-encoded fixed-width column without nulls (the activation column as
  our writer stores it by default) holds its values as raw bytes after each page's levels: `plain_values` returns
  views of them in the map, so the loader copies each vector once, from the map into its store, where pyarrow's
  decoder would first copy the whole row group into a buffer of its own.

pyarrow does not expose page headers, hence the small Thrift compact-protocol reader below: it reads the fields
of a PageHeader and of its data page header that these need and skips the rest. Anything that does not parse
as pages filling the chunk exactly is reported as damaged; a page without a CRC is passed, as pyarrow passes it;
a chunk whose pages are not plain, uncompressed and free of nulls is left to pyarrow (`plain_values` returns None).
TODO(https://github.com/apache/arrow/blob/main/cpp/src/arrow/util/crc32.cc): check CRCs through pyarrow again once
Arrow's CRC-32 (slicing-by-16 tables there) is as fast as ISA-L's.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import zlib
from typing import NamedTuple

import numpy as np

try:  # ISA-L: same CRC-32 as zlib's, several times faster; zlib's serves (same results) where it is missing
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency; kept for platforms without its wheel
    crc32 = zlib.crc32

__all__ = ["DamagedPage", "Page", "check_column_chunk", "pages", "plain_values", "populate"]

# Thrift compact-protocol type codes (https://github.com/apache/thrift/blob/master/doc/specs/thrift-compact-protocol.md)
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)
# parquet.thrift: PageHeader fields, page types, the PLAIN encoding and the nested data page headers' fields
_TYPE, _COMPRESSED_PAGE_SIZE, _CRC, _DATA_PAGE_HEADER, _DATA_PAGE_HEADER_V2 = 1, 3, 4, 5, 8
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
_PLAIN = 0
_V1_NUM_VALUES, _V1_ENCODING = 1, 2
_V2_NUM_VALUES, _V2_NUM_NULLS, _V2_ENCODING, _V2_DEF_BYTES, _V2_REP_BYTES, _V2_IS_COMPRESSED = 1, 2, 4, 5, 6, 7


class DamagedPage(OSError):
    """A page whose bytes do not match its CRC, or a column chunk that does not parse as pages."""


class Page(NamedTuple):
    offset: int          # of the page's bytes (after its header) in the chunk
    size: int            # compressed_page_size: the bytes the CRC covers
    crc: int | None      # as stored (unsigned), None when the page has none
    kind: int            # PageType
    data: dict           # the i32 and bool fields of its DataPageHeader or DataPageHeaderV2 ({} for other pages)


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
    """Each Page of a column chunk's bytes, in order."""
    position, end = 0, len(chunk)
    while position < end:
        reader = _Reader(chunk, position, end)
        found, data = {}, {}

        def data_field(number, kind):
            if kind == _I32:
                data[number] = reader.zigzag()
            elif kind in (_TRUE, _FALSE):
                data[number] = kind == _TRUE
            else:
                reader.skip(kind)

        def field(number, kind):
            if number in (_TYPE, _COMPRESSED_PAGE_SIZE, _CRC) and kind == _I32:
                found[number] = reader.zigzag()
            elif number in (_DATA_PAGE_HEADER, _DATA_PAGE_HEADER_V2) and kind == _STRUCT:
                reader.struct(data_field)
            else:
                reader.skip(kind)

        reader.struct(field)
        size = found.get(_COMPRESSED_PAGE_SIZE)
        if size is None or size < 0 or reader.position + size > end:
            raise DamagedPage(f"page header at byte {position} of the column chunk gives no valid size "
                              f"(compressed_page_size={size}, the chunk has {end} bytes)")
        crc = found.get(_CRC)
        yield Page(reader.position, size, None if crc is None else crc & 0xFFFFFFFF, found.get(_TYPE, -1), data)
        position = reader.position + size


def check_column_chunk(chunk: memoryview, name: str, file_offset: int = 0) -> list[Page]:
    """Checks the CRC of every page of a column chunk's bytes (`name` and `file_offset`, where the chunk starts in
    its file, are for messages) and returns its pages. DamagedPage names the first page that fails."""
    try:
        found = list(pages(chunk))
    except DamagedPage as damaged:
        raise DamagedPage(f"column {name} (chunk at byte {file_offset}): {damaged}") from None
    for page in found:
        if page.crc is not None:
            computed = crc32(chunk[page.offset:page.offset + page.size]) & 0xFFFFFFFF
            if computed != page.crc:
                raise DamagedPage(f"column {name}, page at byte {file_offset + page.offset}: CRC checksum "
                                  f"verification failed (stored {page.crc:#010x}, computed {computed:#010x})")
    return found


def _all_defined(chunk: memoryview, start: int, length: int, count: int) -> bool:
    """Whether the definition levels chunk[start:start + length] (bit width 1) are RLE runs of ones that add up to
    `count` (bit-packed groups are left to pyarrow)."""
    reader, total = _Reader(chunk, start, start + length), 0
    try:
        while reader.position < start + length:
            header = reader.varint()
            if header & 1 or reader.byte() != 1:
                return False
            total += header >> 1
    except DamagedPage:
        return False
    return total == count


def plain_values(chunk: memoryview, found: list[Page], width: int, max_definition_level: int,
                 max_repetition_level: int) -> list[np.ndarray] | None:
    """uint8 [n, width] views of the values of each data page of an UNCOMPRESSED column chunk of fixed-width
    values, in order; None when any page is not PLAIN, holds nulls or repeated values, or is a dictionary page
    (pyarrow decodes those). The caller has checked that the chunk is uncompressed and of that width."""
    if max_repetition_level != 0 or max_definition_level > 1:
        return None
    views = []
    for page in found:
        if page.kind == _DATA_PAGE:
            count = page.data.get(_V1_NUM_VALUES, -1)
            if page.data.get(_V1_ENCODING) != _PLAIN or count < 0:
                return None
            start = page.offset
            if max_definition_level:  # levels: a 4-byte little-endian length, then the RLE/bit-packed hybrid
                if page.size < 4:
                    return None
                levels = int.from_bytes(chunk[start:start + 4], "little")
                if not _all_defined(chunk, start + 4, levels, count):
                    return None
                start += 4 + levels
        elif page.kind == _DATA_PAGE_V2:
            count = page.data.get(_V2_NUM_VALUES, -1)
            if (page.data.get(_V2_ENCODING) != _PLAIN or page.data.get(_V2_NUM_NULLS, -1) != 0 or count < 0
                    or page.data.get(_V2_REP_BYTES, 0) != 0):
                return None
            start = page.offset + page.data.get(_V2_DEF_BYTES, 0) + page.data.get(_V2_REP_BYTES, 0)
        elif page.kind == _DICTIONARY_PAGE:
            return None
        else:  # index pages hold no values
            continue
        if page.offset + page.size - start != count * width:
            return None
        views.append(np.frombuffer(chunk, np.uint8, count * width, start).reshape(count, width))
    return views


_MADV_POPULATE_READ = 22  # linux/mman.h, Linux 5.14+
_PAGE = 4096
_madvise = None


def populate(address: int, size: int) -> None:
    """Asks the kernel to map the file pages under [address, address + size) of a read-only memory map in one call
    (madvise MADV_POPULATE_READ), rather than in one page fault per 4 KiB as the first copy touches them. A hint:
    nothing happens where it is not supported (other systems, older kernels)."""
    global _madvise
    if not sys.platform.startswith("linux") or size <= 0:
        return
    if _madvise is None:
        try:
            _madvise = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).madvise
            _madvise.argtypes, _madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError):
            _madvise = False
    if _madvise:
        start = address // _PAGE * _PAGE
        _madvise(start, address + size - start, _MADV_POPULATE_READ)
