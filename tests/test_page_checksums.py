"""The reader's own page CRC check (pipeline.page_checksums) against pyarrow's, on files pyarrow writes in every
shape the Parquet writer produces: codecs, data page versions, dictionary pages, nullable and required columns,
many small pages."""
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import page_checksums


def _table(rows=3000):
    rng = np.random.default_rng(0)
    return pa.table({
        "vectors": pa.array([bytes(rng.integers(0, 256, 64, dtype=np.uint8)) for _ in range(rows)], pa.binary(64)),
        "words": pa.array([f"w{i % 7}" if i % 5 else None for i in range(rows)]),  # dictionary-encoded, nulls
        "numbers": pa.array(rng.integers(0, 1 << 40, rows), pa.int64()),
    }, schema=pa.schema([pa.field("vectors", pa.binary(64), nullable=False), ("words", pa.string()),
                         ("numbers", pa.int64())]))


def _chunks(path):
    footer = pq.ParquetFile(path).metadata
    data = memoryview(open(path, "rb").read())
    for group in range(footer.num_row_groups):
        for column in range(footer.num_columns):
            chunk = footer.row_group(group).column(column)
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            yield chunk.path_in_schema, start, data[start:start + chunk.total_compressed_size]


@pytest.mark.parametrize("compression", ["none", "zstd", "snappy"])
@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_every_page_is_found_and_checked(tmp_path, compression, version):
    path = str(tmp_path / "t.parquet")
    pq.write_table(_table(), path, compression=compression, data_page_version=version, max_rows_per_page=50,
                   row_group_size=1000, write_page_checksum=True)
    pages = 0
    for name, start, chunk in _chunks(path):
        found = list(page_checksums.pages(chunk))
        assert found and all(crc is not None for _, _, crc in found)
        assert found[-1][0] + found[-1][1] == len(chunk)  # the pages fill the chunk exactly
        assert page_checksums.check_column_chunk(chunk, name, start) == len(found)
        pages += len(found)
    assert pages > 3 * 3 * 2  # several pages per chunk: the walk goes past the first


def test_a_flipped_byte_in_any_page_is_found_as_pyarrow_finds_it(tmp_path):
    path = str(tmp_path / "t.parquet")
    pq.write_table(_table(600), path, compression="none", max_rows_per_page=50, row_group_size=600,
                   write_page_checksum=True)
    intact = open(path, "rb").read()
    for name, start, chunk in _chunks(path):
        for offset, size, _ in list(page_checksums.pages(chunk))[:3]:
            damaged = bytearray(intact)
            damaged[start + offset + size // 2] ^= 0x10
            view = memoryview(bytes(damaged))[start:start + len(chunk)]
            with pytest.raises(page_checksums.DamagedPage, match=f"column {name}, page at byte "
                                                                 f"{start + offset}: CRC checksum verification"):
                page_checksums.check_column_chunk(view, name, start)
            with pytest.raises(OSError, match="CRC checksum verification failed"):
                pq.read_table(pa.BufferReader(bytes(damaged)), columns=[name], page_checksum_verification=True)


def test_pages_without_a_crc_pass_as_pyarrow_passes_them(tmp_path):
    path = str(tmp_path / "t.parquet")
    pq.write_table(_table(300), path, write_page_checksum=False)
    for name, start, chunk in _chunks(path):
        assert all(crc is None for _, _, crc in page_checksums.pages(chunk))
        assert page_checksums.check_column_chunk(chunk, name, start) >= 1


@pytest.mark.parametrize("cut", [1, 7, 40])
def test_a_chunk_that_is_not_pages_is_refused_with_its_place(tmp_path, cut):
    path = str(tmp_path / "t.parquet")
    pq.write_table(_table(300), path, write_page_checksum=True)
    name, start, chunk = next(_chunks(path))
    with pytest.raises(page_checksums.DamagedPage, match=f"column {name} \\(chunk at byte {start}\\)"):
        page_checksums.check_column_chunk(chunk[:len(chunk) - cut], name, start)  # truncated
    garbage = memoryview(bytes([0xFF]) * 64)
    with pytest.raises(page_checksums.DamagedPage):
        page_checksums.check_column_chunk(garbage, name, start)


def test_the_crc_is_zlibs():
    payload = bytes(range(256)) * 1000
    assert page_checksums.crc32(payload) & 0xFFFFFFFF == zlib.crc32(payload)
