"""The reader's own page walk (pipeline.parquet_pages) against pyarrow's decoder, on files pyarrow writes in every
shape its Parquet writer produces: codecs, data page versions, dictionary pages, nullable and required columns,
nulls, many small pages. CRCs must fail where pyarrow's fail, and values found in place must be pyarrow's."""
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import parquet_pages


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
        found = list(parquet_pages.pages(chunk))
        assert found and all(page.crc is not None for page in found)
        assert found[-1].offset + found[-1].size == len(chunk)  # the pages fill the chunk exactly
        assert parquet_pages.check_column_chunk(chunk, name, start) == found
        pages += len(found)
    assert pages > 3 * 3 * 2  # several pages per chunk: the walk goes past the first


def test_a_flipped_byte_in_any_page_is_found_as_pyarrow_finds_it(tmp_path):
    path = str(tmp_path / "t.parquet")
    pq.write_table(_table(600), path, compression="none", max_rows_per_page=50, row_group_size=600,
                   write_page_checksum=True)
    intact = open(path, "rb").read()
    for name, start, chunk in _chunks(path):
        for offset, size, *_ in list(parquet_pages.pages(chunk))[:3]:
            damaged = bytearray(intact)
            damaged[start + offset + size // 2] ^= 0x10
            view = memoryview(bytes(damaged))[start:start + len(chunk)]
            with pytest.raises(parquet_pages.DamagedPage, match=f"column {name}, page at byte "
                                                                 f"{start + offset}: CRC checksum verification"):
                parquet_pages.check_column_chunk(view, name, start)
            with pytest.raises(OSError, match="CRC checksum verification failed"):
                pq.read_table(pa.BufferReader(bytes(damaged)), columns=[name], page_checksum_verification=True)


def test_pages_without_a_crc_pass_as_pyarrow_passes_them(tmp_path):
    path = str(tmp_path / "t.parquet")
    pq.write_table(_table(300), path, write_page_checksum=False)
    for name, start, chunk in _chunks(path):
        assert all(page.crc is None for page in parquet_pages.pages(chunk))
        assert parquet_pages.check_column_chunk(chunk, name, start)


@pytest.mark.parametrize("cut", [1, 7, 40])
def test_a_chunk_that_is_not_pages_is_refused_with_its_place(tmp_path, cut):
    path = str(tmp_path / "t.parquet")
    pq.write_table(_table(300), path, write_page_checksum=True)
    name, start, chunk = next(_chunks(path))
    with pytest.raises(parquet_pages.DamagedPage, match=f"column {name} \\(chunk at byte {start}\\)"):
        parquet_pages.check_column_chunk(chunk[:len(chunk) - cut], name, start)  # truncated
    garbage = memoryview(bytes([0xFF]) * 64)
    with pytest.raises(parquet_pages.DamagedPage):
        parquet_pages.check_column_chunk(garbage, name, start)


def test_the_crc_is_zlibs():
    payload = bytes(range(256)) * 1000
    assert parquet_pages.crc32(payload) & 0xFFFFFFFF == zlib.crc32(payload)


def _schema_column(path, name):
    schema = pq.ParquetFile(path).metadata.schema
    return schema.column(schema.to_arrow_schema().names.index(name))


@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("nullable", [True, False])
def test_plain_values_in_place_are_pyarrows_values(tmp_path, version, nullable):
    rng = np.random.default_rng(1)
    vectors = rng.integers(0, 256, (700, 48), dtype=np.uint8)
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(48), 700, [None, pa.py_buffer(vectors.tobytes())])
    table = pa.table([column], schema=pa.schema([pa.field("v", pa.binary(48), nullable=nullable)]))
    path = str(tmp_path / "t.parquet")
    pq.write_table(table, path, compression="none", use_dictionary=False, data_page_version=version,
                   max_rows_per_page=64, row_group_size=300, write_page_checksum=True)
    schema_column = _schema_column(path, "v")
    found_rows = []
    for name, start, chunk in _chunks(path):
        views = parquet_pages.plain_values(chunk, parquet_pages.check_column_chunk(chunk, name, start), 48,
                                           schema_column.max_definition_level, schema_column.max_repetition_level)
        assert views is not None and len(views) > 1 and all(not v.flags.writeable for v in views)
        found_rows.append(np.concatenate(views))
    np.testing.assert_array_equal(np.concatenate(found_rows), vectors)


@pytest.mark.parametrize("shape", ["nulls", "dictionary"])
def test_pages_that_are_not_plain_and_full_are_left_to_pyarrow(tmp_path, shape):
    values = [bytes([i % 5]) * 16 if shape == "dictionary" or i % 3 else None for i in range(200)]
    table = pa.table({"v": pa.array(values, pa.binary(16))})
    path = str(tmp_path / "t.parquet")
    pq.write_table(table, path, compression="none", use_dictionary=shape == "dictionary", write_page_checksum=True)
    schema_column = _schema_column(path, "v")
    name, start, chunk = next(_chunks(path))
    found = parquet_pages.check_column_chunk(chunk, name, start)
    assert parquet_pages.plain_values(chunk, found, 16, schema_column.max_definition_level,
                                      schema_column.max_repetition_level) is None
