"""A long-format Parquet file's rows as the text its CSV would hold, so both meet the same row checks.

`column_type_problems` says which columns have an Arrow type that cannot be read as readings;
`text_rows` renders one record batch cell by cell as a CSV cell would read: a missing cell (null,
or NaN in a float column) is empty, a timestamp is ISO 8601 (a zone, if any, becomes its offset), a
whole number has no decimal point (o2 1.0 is 1) and a fraction keeps its column's precision (a
float32 98.6 is 98.6). Nothing here judges a reading: `ingest._parse_row` does, for CSV and Parquet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BATCH_ROWS = 65_536  # rows held as Arrow at a time


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)  # null: every cell empty


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)


# column -> (whether its Arrow type can be read, what can: the fix)
READABLE_TYPES: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "patient_id": (lambda kind: _is_text(kind) or pa.types.is_integer(kind), "write the ids as text or integers"),
    "timestamp": (lambda kind: _is_text(kind) or pa.types.is_timestamp(kind), "write a timestamp type (a time zone is fine) or ISO 8601 text"),
    "signal": (_is_text, "write the signal names as text"),
    "value": (lambda kind: _is_text(kind) or _is_number(kind), "write numbers, or text (avpu values are text: A, C, V, P, U)"),
}


def column_type_problems(schema: pa.Schema) -> list[str]:
    """One line for each long-format column whose Arrow type cannot be read (or that appears twice)."""
    problems = []
    for column, (readable, fix) in READABLE_TYPES.items():
        kinds = [field.type for field in schema if field.name == column]
        if len(kinds) > 1:
            problems.append(f"column {column}: appears {len(kinds)} times; keep one")
        elif kinds and not readable(kinds[0].value_type if pa.types.is_dictionary(kinds[0]) else kinds[0]):
            problems.append(f"column {column}: type {kinds[0]} cannot be read as readings; {fix}")
    return problems


def batches(parquet: pq.ParquetFile) -> Iterator[pa.RecordBatch]:
    """The long-format columns of the file, one record batch at a time (Arrow errors of a damaged file arise while iterating)."""
    return parquet.iter_batches(batch_size=BATCH_ROWS, columns=list(READABLE_TYPES))


def text_rows(batch: pa.RecordBatch) -> list[dict[str, str]]:
    """Every row of one batch as the text of its CSV row, column by column."""
    cells = [_column_text(batch.column(column)) for column in READABLE_TYPES]
    return [dict(zip(READABLE_TYPES, row)) for row in zip(*cells)]


def _column_text(column: pa.Array) -> list[str]:
    kind = column.type  # a dictionary (a pandas categorical) holds text: to_pylist decodes it
    if pa.types.is_timestamp(kind):
        if kind.unit == "ns":  # Python's datetime stops at microseconds; a reading's time needs no more
            column = column.cast(pa.timestamp("us", tz=kind.tz), safe=False)
        return ["" if when is None else when.isoformat() for when in column.to_pylist()]
    if pa.types.is_floating(kind):
        return [_float_text(number) for number in column.to_numpy(zero_copy_only=False)]
    if pa.types.is_decimal(kind):
        return ["" if number is None else format(number.normalize(), "f") for number in column.to_pylist()]
    return ["" if cell is None else str(cell) for cell in column.to_pylist()]


def _float_text(number: np.floating) -> str:
    if np.isnan(number):
        return ""  # how pandas writes a missing reading
    if number.is_integer() and abs(number) < 2**53:
        return str(int(number))
    return str(number)  # the shortest text that reads back as this number at its own precision
