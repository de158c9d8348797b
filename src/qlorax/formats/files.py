"""Data file types: JSONL, JSON, Parquet, Arrow IPC and CSV, read row by row.

Every reader streams: JSONL line by line, a JSON array object by object, Parquet and Arrow in
record batches, CSV record by record (Python's csv module), so a file is never loaded whole to be
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
_CSV_FIELD_CHARS = 64 << 20  # csv's default (128 KiB) is shorter than some long documents

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
        source = pq.ParquetFile(path, pre_buffer=False)  # no read-ahead threads left behind at exit
        yield from _batches_as_rows(source.iter_batches(batch_size=_BATCH_ROWS, use_threads=False), display)
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


def _csv_rows(path: Path, display: str) -> Iterator[Row]:
    """Every column read as text (no type guessing); an empty field is an empty string, a blank
    line is skipped. Python's csv module, not pyarrow's: pyarrow's reader leaves a read-ahead
    thread that can abort the process at exit (apache/arrow#34314), which turned exit 2 into a
    crash; rows go to tokenization one by one, so its speed is not the bottleneck."""
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_CHARS))
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark
        reader = csv.reader(handle, strict=True)
        try:
            header = next(reader, None)
            if not header:
                raise DataError(f"data file {display} contains no examples (no CSV header)")
            number = 0
            for values in reader:
                if not values:
                    continue
                if len(values) != len(header):
                    raise DataError(f"{display} line {reader.line_num}: the CSV row has {len(values)} column(s) "
                                    f"where the header has {len(header)} ({', '.join(header)})")
                number += 1
                yield f"{display} row {number}", dict(zip(header, values, strict=True))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{display} line {max(reader.line_num, 1)}: cannot be read as CSV ({exc})") from None
