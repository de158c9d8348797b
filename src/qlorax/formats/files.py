"""Data file types: JSONL, JSON, Parquet, Arrow IPC and CSV, read row by row.

Every reader streams: JSONL line by line, a JSON array object by object, Parquet and Arrow in
record batches, CSV in 16 MiB blocks (pyarrow.csv.open_csv), so a file is never loaded whole to be
parsed. Each row comes with where it is (`file:line` for JSONL, `file row N` for the others,
rows counted from 1, a CSV header not counted), and a file that cannot be parsed is a DataError
naming the row. pyarrow is imported only when a tabular file is read (the config imports this
package). Torch-free.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlorax.errors import DataError

FILE_TYPES: tuple[str, ...] = ("auto", "jsonl", "json", "parquet", "arrow", "csv")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
              ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow", ".csv": "csv"}
_BATCH_ROWS = 1024
_CHUNK_BYTES = 1 << 20
_CSV_BLOCK_BYTES = 16 << 20  # a CSV row must fit in one block: generous, still not the whole file

Row = tuple[str, Any]  # (where, the parsed row)


def file_type_of(path: Path, configured: str) -> str:
    """`data.file_type`, or (auto) the type the file's extension names; any other extension is
    read as JSONL, as every data file was before the other types."""
    if configured != "auto":
        return configured
    return EXTENSIONS.get(path.suffix.lower(), "jsonl")


def iter_rows(path: Path, file_type: str, display: str) -> Iterator[Row]:
    """Every row of the file with where it is; a row that cannot be parsed raises DataError."""
    readers = {"jsonl": _jsonl_rows, "json": _json_rows, "parquet": _parquet_rows, "arrow": _arrow_rows,
               "csv": _csv_rows}
    yield from readers[file_type](path, display)


def _jsonl_rows(path: Path, display: str) -> Iterator[Row]:
    with path.open("rb") as handle:
        for number, line_bytes in enumerate(handle, start=1):
            yield from _json_line(line_bytes.rstrip(b"\n"), f"{display}:{number}")


def _json_line(line_bytes: bytes, where: str) -> Iterator[Row]:
    try:
        line = line_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not valid UTF-8 (byte 0x{line_bytes[exc.start]:02x} at column "
                        f"{exc.start + 1})") from None
    if not line.strip():
        return
    try:
        yield where, json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _json_rows(path: Path, display: str) -> Iterator[Row]:
    """A JSON array of objects, decoded one element at a time; a file that is not an array is
    read as JSON lines (what `.json` often holds)."""
    with path.open("rb") as handle:
        head = handle.read(_CHUNK_BYTES).lstrip()
        if not head.startswith(b"["):
            handle.seek(0)
            yield from (row for n, b in enumerate(handle, 1) for row in _json_line(b.rstrip(b"\n"), f"{display}:{n}"))
            return
        yield from _json_array(handle, head[1:], display)


def _json_array(handle: Any, pending: bytes, display: str) -> Iterator[Row]:
    """The elements of a JSON array, decoded as the file is read in chunks."""
    decoder = json.JSONDecoder()
    buffer, number, more = "", 0, b"start"
    while more:
        more = handle.read(_CHUNK_BYTES)
        pending += more
        try:
            buffer, pending = buffer + pending.decode("utf-8"), b""
        except UnicodeDecodeError as exc:
            if not more:
                raise DataError(f"{display} element {number + 1}: not valid UTF-8") from None
            buffer, pending = buffer + pending[:exc.start].decode("utf-8"), pending[exc.start:]
        while True:
            buffer = buffer.lstrip()
            if buffer.startswith("]"):
                return
            if number and buffer.startswith(","):
                buffer = buffer[1:].lstrip()
            try:
                value, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError as exc:
                if not more:
                    raise DataError(f"{display} element {number + 1}: invalid JSON ({exc.msg})") from None
                break
            number, buffer = number + 1, buffer[end:]
            yield f"{display} element {number}", value
    raise DataError(f"{display}: the JSON array is not closed with ']'")


def _batches_as_rows(batches: Iterator[Any], display: str) -> Iterator[Row]:
    """Rows of Arrow record batches as dicts; a null is an absent value (an optional column)."""
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield f"{display} row {number}", {k: v for k, v in row.items() if v is not None}


def _arrow_failure(kind: str, display: str, exc: Exception) -> DataError:
    return DataError(f"data file {display} cannot be read as {kind}: {str(exc).splitlines()[0]}")


def _parquet_rows(path: Path, display: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(path)
        yield from _batches_as_rows(source.iter_batches(batch_size=_BATCH_ROWS), display)
    except (pa.ArrowException, OSError) as exc:
        raise _arrow_failure("Parquet", display, exc) from None


def _arrow_rows(path: Path, display: str) -> Iterator[Row]:
    """Arrow IPC: the file format (random access), else the stream format."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_file(source)
                batches: Iterator[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                source.seek(0)
                batches = iter(pa.ipc.open_stream(source))
            yield from _batches_as_rows(batches, display)
    except (pa.ArrowException, OSError) as exc:
        raise _arrow_failure("Arrow IPC", display, exc) from None


def _csv_header(path: Path, display: str) -> list[str]:
    with path.open(newline="", encoding="utf-8") as handle:
        try:
            header = next(csv.reader(handle), None)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{display} line 1: cannot read the CSV header ({exc})") from None
    if not header:
        raise DataError(f"data file {display} contains no examples (no CSV header)")
    return header


def _csv_rows(path: Path, display: str) -> Iterator[Row]:
    """Every column read as text (no type guessing); an empty field is an empty string."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    header = _csv_header(path, display)
    bad: list[Any] = []

    def refuse(row: Any) -> str:
        bad.append(row)
        return "error"

    convert = pcsv.ConvertOptions(column_types={name: pa.string() for name in header}, strings_can_be_null=False)
    reader = None
    try:
        reader = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=_CSV_BLOCK_BYTES, use_threads=False),
                               parse_options=pcsv.ParseOptions(newlines_in_values=True, invalid_row_handler=refuse),
                               convert_options=convert)
        yield from _batches_as_rows(reader, display)
    except (pa.ArrowException, OSError) as exc:
        failure = _arrow_failure("CSV", display, exc)
        if bad:  # plain values: the reader and its rows are released before the error travels
            number, actual, expected = bad[0].number, bad[0].actual_columns, bad[0].expected_columns
            line = f" line {number}" if number is not None else ""
            failure = DataError(f"{display}{line}: the CSV row has {actual} column(s) where the header has "
                                f"{expected} ({', '.join(header)})")
        bad.clear()
        raise failure from None
    finally:
        if reader is not None:
            reader.close()  # its read-ahead thread must not outlive the reader (abort at exit otherwise)
