"""Plain numeric Parquet columns decoded page by page give exactly what pyarrow reads.

Every case writes a real file with pyarrow's writer (its options choosing the page layout),
reads it through the scoring reader, and compares each chunk with pyarrow's own reading of
the same rows; each case also asserts which columns took the page decoder, so that a
comparison cannot pass by pyarrow having read everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stemma.components.errors import DataError
from stemma.components.scoring import parquet_pages
from stemma.components.scoring.engine import _file_chunks, _rechunk

ROWS = 50_000


def pyarrow_chunks(path: Path, columns: list[str], chunk_rows: int) -> list[pa.Table]:
    batches = pq.ParquetFile(path).iter_batches(batch_size=chunk_rows, columns=columns)
    return list(_rechunk(batches, chunk_rows))


def read(path: Path, columns: list[str], chunk_rows: int, first_chunk: int = 0) -> list[pa.Table]:
    return list(_file_chunks(path, columns, chunk_rows, {}, first_chunk))


def assert_same(path: Path, columns: list[str], chunk_rows: int, first_chunk: int = 0) -> None:
    expected = pyarrow_chunks(path, columns, chunk_rows)[first_chunk:]
    got = read(path, columns, chunk_rows, first_chunk)
    assert [table.num_rows for table in got] == [table.num_rows for table in expected]
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.schema.names == theirs.schema.names
        assert ours.schema.types == theirs.schema.types
        assert ours.equals(theirs)


def fast(path: Path, columns: list[str], first_row: int = 0) -> list[str]:
    return parquet_pages.fast_columns(pq.ParquetFile(path), columns, first_row)


def numbers(seed: int = 0, rows: int = ROWS) -> dict[str, np.ndarray]:
    """Columns of every type read here, with many distinct values, and two that are not."""
    rng = np.random.default_rng(seed)
    return {
        "id": np.arange(10_000_000, 10_000_000 + rows, dtype=np.int64),
        "i32": rng.integers(-(2**31), 2**31 - 1, rows, dtype=np.int32),
        "f32": rng.standard_normal(rows).astype(np.float32),
        "f64": rng.uniform(0, 150_000, rows).round(2),
        "few": rng.integers(0, 5, rows),  # low cardinality: pyarrow's
        "text": np.array([f"k{value}" for value in rng.integers(0, 9, rows)]),
    }


PLAIN = ["id", "i32", "f32", "f64"]
ALL = [*PLAIN, "few", "text"]


def write(
    path: Path, columns: dict[str, Any], schema: pa.Schema | None = None, **options: Any
) -> Path:
    pq.write_table(pa.table(columns, schema=schema), path, **options)
    return path


@pytest.mark.parametrize(
    "options",
    [
        {},  # pyarrow's defaults: Snappy, dictionary then plain once it is full, v1 pages
        {"compression": "none"},
        {"use_dictionary": False},
        {"data_page_version": "2.0"},
        {"data_page_version": "2.0", "compression": "none"},
        # small dictionaries and pages: many pages, dictionary pages in every row group
        {"dictionary_pagesize_limit": 4096, "data_page_size": 8192, "row_group_size": 12_345},
        {"write_page_checksum": True, "row_group_size": 20_000},
    ],
    ids=["defaults", "uncompressed", "plain", "v2", "v2-uncompressed", "small-pages", "crc"],
)
@pytest.mark.parametrize("chunk_rows", [7_777, 20_000, ROWS])
def test_chunks_equal_pyarrows(tmp_path: Path, options: dict[str, Any], chunk_rows: int) -> None:
    path = write(tmp_path / "in.parquet", numbers(), **options)
    # without dictionaries, the few-valued column is stored plain too
    plain = ["few"] if options.get("use_dictionary") is False else []
    assert fast(path, ALL) == [*PLAIN, *plain]
    assert_same(path, ALL, chunk_rows)
    assert_same(path, ["f64", "id"], chunk_rows)  # the order asked for, fast columns alone


@pytest.mark.parametrize("first_chunk", [1, 2, 5])
def test_a_resumed_read_starts_at_its_chunk(tmp_path: Path, first_chunk: int) -> None:
    """Starting mid-file (a resumed scoring) skips row groups unread and pages undecoded."""
    path = write(
        tmp_path / "in.parquet", numbers(), row_group_size=9_000, dictionary_pagesize_limit=8192
    )
    assert fast(path, PLAIN, first_chunk * 7_000) == PLAIN
    assert_same(path, ALL, 7_000, first_chunk)


def test_required_columns_have_no_levels_to_read(tmp_path: Path) -> None:
    columns = numbers()
    schema = pa.schema(
        [pa.field(name, pa.array(columns[name]).type, nullable=name != "f64") for name in columns]
    )
    path = write(tmp_path / "in.parquet", columns, schema=schema, data_page_size=16_384)
    assert pq.ParquetFile(path).metadata.schema.column(3).max_definition_level == 0
    assert fast(path, ALL) == PLAIN
    assert_same(path, ALL, 6_000)


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_dictionary_pages_of_every_width_and_run_shape(
    tmp_path: Path, version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dictionary indices with bit widths from 1 to 17, in bit-packed runs, RLE runs (long
    repeats) and mixes of both, decoded here (the plain-share rule set aside)."""
    rng = np.random.default_rng(3)
    columns = {}
    for distinct in (2, 3, 9, 200, 5_000, 70_000):
        values = rng.integers(0, distinct, ROWS).astype(np.float64) * 0.5
        runs = np.repeat(values[: ROWS // 10], rng.integers(1, 20, ROWS // 10))[:ROWS]
        columns[f"random{distinct}"] = values
        columns[f"runs{distinct}"] = np.resize(runs, ROWS)
    path = write(tmp_path / "in.parquet", columns, data_page_version=version, row_group_size=30_000)
    names = list(columns)
    assert fast(path, names) != names  # mostly indices: left to pyarrow by default
    monkeypatch.setattr(parquet_pages, "PLAIN_SHARE", 0.0)
    assert fast(path, names) == names
    assert_same(path, names, 11_111)


def test_columns_pyarrow_reads_better_or_alone(tmp_path: Path) -> None:
    columns = numbers()
    nulls = columns["f64"].copy()
    nulls[::7] = np.nan
    columns["with_nulls"] = pa.array(nulls, from_pandas=True)
    columns["stamp"] = pa.array(columns["id"].astype("datetime64[us]"))
    columns["small"] = columns["i32"].astype(np.int16)
    path = write(tmp_path / "in.parquet", columns)
    assert fast(path, [*ALL, "with_nulls", "stamp", "small"]) == PLAIN
    assert_same(path, [*ALL, "with_nulls", "stamp", "small"], 9_000)

    for name, options in {
        "zstd": {"compression": "zstd"},
        "split": {"use_dictionary": False, "use_byte_stream_split": True},
        "delta": {"use_dictionary": False, "column_encoding": "DELTA_BINARY_PACKED"},
        "no-statistics": {"write_statistics": False},
    }.items():
        keep = {"split": ["f64"], "delta": ["id"]}.get(name, ["id", "f64"])
        columns = {key: numbers()[key] for key in keep}
        path = write(tmp_path / f"{name}.parquet", columns, **options)
        assert fast(path, list(columns)) == [], name
        assert_same(path, list(columns), 9_000)


def test_a_page_that_breaks_its_metadatas_promise_is_read_on_by_pyarrow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer whose statistics count no nulls where a page holds some cannot be made with
    pyarrow, so the page check is made to fail from the third row group on: the chunks
    before it come from the page decoder, the rest from pyarrow, with the same values."""
    path = write(tmp_path / "in.parquet", numbers(), row_group_size=10_000)
    pages = []
    checked = parquet_pages._all_defined

    def fails_late(levels: memoryview, count: int) -> bool:
        pages.append(count)
        return checked(levels, count) and sum(pages) <= 4 * 20_000  # four columns, 2 groups

    monkeypatch.setattr(parquet_pages, "_all_defined", fails_late)
    assert_same(path, ALL, 8_000)
    assert sum(pages) > 4 * 20_000


def test_a_corrupt_page_is_pyarrows_error_after_the_good_chunks(tmp_path: Path) -> None:
    path = write(tmp_path / "in.parquet", numbers(), row_group_size=25_000)
    metadata = pq.ParquetFile(path).metadata
    column = metadata.row_group(1).column(3)  # f64 of the second row group
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    middle = start + column.total_compressed_size // 2
    data[middle : middle + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))

    chunks = _file_chunks(path, ALL, 25_000, {})
    first = next(chunks)
    assert first.equals(pq.ParquetFile(path).read_row_group(0, columns=ALL))
    with pytest.raises(DataError, match="cannot read it"):
        next(chunks)


@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("compression", ["none", "snappy"])
def test_damaged_pages_read_as_pyarrow_reads_them(
    tmp_path: Path, compression: str, version: str
) -> None:
    """One to three bytes overwritten near the start of a page (its header, levels,
    dictionary indices or first values): the scoring reader gives pyarrow's chunks or
    pyarrow's error, never another exception or other values."""
    good = write(
        tmp_path / "good.parquet",
        numbers(),
        compression=compression,
        data_page_version=version,
        row_group_size=20_000,
        dictionary_pagesize_limit=16_384,
    )
    data = good.read_bytes()
    metadata = pq.ParquetFile(good).metadata
    starts = [
        offset
        for group in range(metadata.num_row_groups)
        for index in range(metadata.num_columns)
        for offset in (
            metadata.row_group(group).column(index).dictionary_page_offset,
            metadata.row_group(group).column(index).data_page_offset,
        )
        if offset
    ]
    rng = np.random.default_rng(11)
    outcomes = {"error": 0, "read": 0}
    for trial in range(60):
        offset = int(starts[rng.integers(0, len(starts))] + rng.integers(0, 80))
        size = int(rng.integers(1, 4))
        damaged = bytearray(data)
        damaged[offset : offset + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        path = tmp_path / f"damaged-{trial}.parquet"
        path.write_bytes(bytes(damaged))
        try:
            expected = pyarrow_chunks(path, ALL, 9_000)
        except (OSError, pa.ArrowException):
            outcomes["error"] += 1
            with pytest.raises(DataError, match="cannot read it"):
                read(path, ALL, 9_000)
            continue
        outcomes["read"] += 1
        got = read(path, ALL, 9_000)
        assert len(got) == len(expected)
        for ours, theirs in zip(got, expected, strict=True):
            assert ours.schema == theirs.schema
            for mine, its in zip(ours.columns, theirs.columns, strict=True):
                if pa.types.is_floating(mine.type):  # damaged bytes can make NaNs
                    assert np.array_equal(mine.to_numpy(), its.to_numpy(), equal_nan=True)
                else:
                    assert mine.equals(its)
    assert outcomes["error"] and outcomes["read"]  # damage of both kinds was met


@pytest.mark.parametrize("level", [0, 0x40])
def test_v2_definition_levels_are_checked_too(tmp_path: Path, level: int) -> None:
    """A v2 page's header says it has no nulls, but its levels are what pyarrow reads: all
    null (0) or out of range (0x40) in the first page of ``id``, read as pyarrow reads it."""
    path = write(tmp_path / "in.parquet", numbers(), data_page_version="2.0")
    offset = pq.ParquetFile(path).metadata.row_group(0).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    header, body = parquet_pages._struct(memoryview(bytes(data)), offset)
    assert header[1] == 3 and header[8][5] > 0  # a v2 data page with definition levels
    levels_end = body + header[8][5]
    data[levels_end - 1] = level  # the value of the levels' one RLE run
    path.write_bytes(bytes(data))
    if level:
        with pytest.raises(OSError, match="levels"):
            pyarrow_chunks(path, ALL, 9_000)
        with pytest.raises(DataError, match="cannot read it"):
            read(path, ALL, 9_000)
    else:
        assert pyarrow_chunks(path, ALL, 9_000)[0].column("id").null_count > 0
        assert_same(path, ALL, 9_000)


def test_hybrid_decoding_matches_a_plain_encoder() -> None:
    """RLE and bit-packed runs of the widths dictionaries use, against a reference encoder."""
    rng = np.random.default_rng(7)
    for width in (1, 2, 5, 8, 13, 17, 24, 32):
        expected: list[int] = []
        stream = bytearray([width])
        for _ in range(40):
            if rng.random() < 0.4:
                value, length = int(rng.integers(0, 2**width)), int(rng.integers(1, 300))
                stream += _uleb(length << 1) + value.to_bytes((width + 7) // 8, "little")
                expected += [value] * length
            else:
                groups = int(rng.integers(1, 70))
                values = [int(v) for v in rng.integers(0, 2**width, groups * 8, dtype=np.uint64)]
                stream += _uleb((groups << 1) | 1) + _pack(values, width)
                expected += values
        count = len(expected) - int(rng.integers(0, 8))  # a last run taken in part
        got = parquet_pages._hybrid(memoryview(bytes(stream)), 1, width, count)
        assert got.tolist() == expected[:count], width


def test_definition_levels_say_whether_a_page_holds_nulls() -> None:
    one_run = memoryview(_uleb(1000 << 1) + b"\x01")
    assert parquet_pages._all_defined(one_run, 1000)
    assert not parquet_pages._all_defined(memoryview(_uleb(1000 << 1) + b"\x00"), 1000)
    packed = memoryview(_uleb((2 << 1) | 1) + _pack([1] * 16, 1))
    assert parquet_pages._all_defined(packed, 16)
    assert not parquet_pages._all_defined(
        memoryview(_uleb((2 << 1) | 1) + _pack([1] * 15 + [0], 1)), 16
    )
    with pytest.raises(parquet_pages.Unsupported):
        parquet_pages._all_defined(memoryview(_uleb(10 << 1) + b"\x01"), 16)


def test_page_headers_keep_their_numbers_and_skip_what_they_do_not_need() -> None:
    """A Thrift compact struct with a field of every kind: numbers, booleans and structs
    are kept; lists, sets, maps, doubles and binaries are stepped over exactly."""
    fields_bytes = [
        [0x15, *_uleb(10)],  # 1: i32 5 (zigzag)
        [0x19, 0x35, *_uleb(2), *_uleb(4), *_uleb(6)],  # 2: list<i32> [1, 2, 3]
        [0x1B, 1, 0x86, 1, ord("k"), *_uleb(14)],  # 3: map<binary, i64> {"k": 7}
        [0x17, *([0] * 8)],  # 4: double
        [0x18, 3, *b"xyz"],  # 5: binary
        [0x11],  # 6: true
        [0x1C, 0x16, *_uleb(5), 0x00],  # 7: struct {1: i64 -3}
        [0x1A, 0x21, 1, 2],  # 8: set<bool> {true, false}
        [0x19, 0xF5, *_uleb(20), *([0x02] * 20)],  # 9: a list of 20 i32 (long form)
        [0x05, *_uleb(600), *_uleb(84)],  # 300: i32 42 (its id written out, zigzag)
        [0x00],
    ]
    data = bytes(byte for field in fields_bytes for byte in field)
    fields, end = parquet_pages._struct(memoryview(data), 0)
    assert fields == {1: 5, 6: True, 7: {1: -3}, 300: 42}
    assert end == len(data)


def _uleb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pack(values: list[int], width: int) -> bytes:
    bits = 0
    for index, value in enumerate(values):
        bits |= value << (index * width)
    return bits.to_bytes(len(values) * width // 8, "little")
