"""Reading tables with a header: CSV or Parquet files, or a directory of them, with pyarrow.

Streamed in chunks of an exact number of rows (CSV by blocks, Parquet by row groups), with the
columns asked for, cast to the types asked for. Every error names the file, and for a value that
does not convert, the row, column and value (located by re-reading the offending file as text:
only on that error path). Row numbers count data rows from 1; for CSV the line is shown too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from hpc.data.manifest import MANIFEST_NAME
from hpc.data.tabular import Where, first_bad_cast

SUFFIXES = {".csv": "csv", ".txt": "csv", ".parquet": "parquet", ".pq": "parquet"}
CHUNK_ROWS = 65536
CSV_BLOCK = 16 << 20  # bytes per CSV block: the column types are inferred from the first one


def file_kind(path: str | os.PathLike) -> str | None:
    """csv | parquet | None, by suffix."""
    return SUFFIXES.get(Path(path).suffix.lower())


def is_table_input(path: str | os.PathLike) -> bool:
    """A table file, or a directory of table files (and no manifest: that is a shard split)."""
    p = Path(path)
    if p.is_file():
        return file_kind(p) is not None
    return p.is_dir() and not (p / MANIFEST_NAME).exists() and any(_listing(p))


def _listing(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.is_file() and file_kind(f) and not f.name.startswith(("_", ".")))


def table_files(path: str | os.PathLike) -> list[Path]:
    """The files of a table input: the file itself, or a directory's *.csv / *.parquet (sorted by
    name; names starting with _ or . are skipped, as pyarrow and Spark do)."""
    p = Path(path)
    if p.is_file():
        if file_kind(p) is None:
            raise ValueError(f"{p}: not a table file; valid are {', '.join(sorted(SUFFIXES))}")
        return [p]
    if p.is_dir():
        files = _listing(p)
        if not files:
            raise ValueError(f"{p}: no table files ({', '.join(sorted(SUFFIXES))}) in this directory")
        kinds = {file_kind(f) for f in files}
        if len(kinds) > 1:
            raise ValueError(f"{p}: holds both CSV and Parquet files; keep one kind per directory")
        return files
    raise ValueError(f"{p}: no such file or directory")


def header_lines(path: Path) -> int | None:
    return 1 if file_kind(path) == "csv" else None


def _csv_reader(path: Path, types: Mapping[str, pa.DataType] | None = None,
                columns: Sequence[str] | None = None):
    conv = pcsv.ConvertOptions(column_types=dict(types or {}), strings_can_be_null=True,
                               include_columns=list(columns) if columns is not None else None)
    try:
        return pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=CSV_BLOCK), convert_options=conv)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: cannot read it as CSV ({e})") from None


def read_schema(path: str | os.PathLike) -> pa.Schema:
    """Column names and types (CSV: inferred from the first block; an all-empty column is text)."""
    path = Path(path)
    if file_kind(path) == "parquet":
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{path}: cannot read it as Parquet ({e})") from None
        return pa.schema([f.with_metadata(None) for f in schema]).remove_metadata()
    schema = _csv_reader(path).schema
    return pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in schema])


def check_columns(path: Path, schema: pa.Schema, needed: Sequence[str], what: str) -> None:
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} ({what}); its columns are {schema.names}")


def count_rows(path: str | os.PathLike) -> int:
    path = Path(path)
    if file_kind(path) == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    first = read_schema(path).names[:1]
    return sum(t.num_rows for _, t in chunks(path, columns=first, types={first[0]: pa.string()}))


def chunks(path: str | os.PathLike, columns: Sequence[str] | None = None,
           types: Mapping[str, pa.DataType] | None = None, rows: int = CHUNK_ROWS,
           first_rows: int | None = None) -> Iterator[tuple[int, pa.Table]]:
    """``(first_row, table)`` of ``rows`` rows each (the first ``first_rows``, the last one shorter),
    in file order, with ``columns`` (default all) cast to ``types`` (the others as the file has them)."""
    path = Path(path)
    types = {c: t for c, t in (types or {}).items() if columns is None or c in columns}
    if file_kind(path) == "parquet":
        source = _parquet_batches(path, columns, types, rows)
    else:
        source = _csv_batches(path, columns, types)
    yield from _rechunk(source, rows, first_rows or rows)


def _parquet_batches(path: Path, columns, types, rows) -> Iterator[tuple[int, pa.RecordBatch]]:
    try:
        pf = pq.ParquetFile(path)
        start = 0
        for b in pf.iter_batches(batch_size=rows, columns=list(columns) if columns is not None else None):
            yield start, _cast(b, types, Where(str(path), start))
            start += b.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: cannot read it as Parquet ({e})") from None


def _cast(b: pa.RecordBatch, types: Mapping[str, pa.DataType], where: Where) -> pa.RecordBatch:
    if not any(b.schema.field(c).type != t for c, t in types.items() if c in b.schema.names):
        return b
    arrays = []
    for name, col in zip(b.schema.names, b.columns):
        t = types.get(name)
        if t is not None and col.type != t:
            col = _cast_column(col, t, name, where)
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, names=b.schema.names)


def _cast_column(col: pa.Array, t: pa.DataType, name: str, where: Where) -> pa.Array:
    if pa.types.is_string(col.type) and not pa.types.is_string(t):
        col = pc.if_else(pc.equal(col, ""), pa.scalar(None, col.type), col)
    try:
        return col.cast(t)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        i, v = first_bad_cast(col, t)
        if i < 0:
            raise
        raise ValueError(f"{where.row(i)}, column {name!r}: {v!r} is not {_what(t)}") from None


def _what(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "an integer (the column is read as integers, from its first rows or its recorded type)"
    if pa.types.is_floating(t):
        return "a number (the column holds numbers)"
    return f"a {t}"


def _csv_batches(path: Path, columns, types) -> Iterator[tuple[int, pa.RecordBatch]]:
    reader = _csv_reader(path, types, columns)
    start = 0
    while True:
        try:
            b = reader.read_next_batch()
        except StopIteration:
            return
        except pa.ArrowInvalid as e:
            _locate_csv_error(path, columns, types, e)
        yield start, b
        start += b.num_rows


def _locate_csv_error(path: Path, columns, types, err: Exception) -> None:
    """Re-read the file as text to name the row, column and value a conversion failed on."""
    names = list(columns) if columns is not None else read_schema(path).names
    text = _csv_reader(path, {c: pa.string() for c in names}, names)
    start = 0
    try:
        for b in text:
            _cast(b, {c: t for c, t in (types or {}).items()}, Where(str(path), start, 1))
            start += b.num_rows
    except pa.ArrowInvalid:
        pass
    raise ValueError(f"{path}: {err}") from None


def _rechunk(source: Iterator[tuple[int, pa.RecordBatch]], rows: int,
             first_rows: int) -> Iterator[tuple[int, pa.Table]]:
    buf: list[pa.RecordBatch] = []
    have, first, want = 0, 0, first_rows
    for _, b in source:
        if b.num_rows == 0:
            continue
        buf.append(b)
        have += b.num_rows
        while have >= want:
            t = pa.Table.from_batches(buf)
            yield first, t.slice(0, want)
            buf = t.slice(want).to_batches()
            have -= want
            first += want
            want = rows
    if have:
        yield first, pa.Table.from_batches(buf)
