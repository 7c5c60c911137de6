"""Validate one site's CSV file against a `CsvSchemaConfig`, collecting every problem before raising.

A hospital runs `validate_site_csv(path, schema)` on its own file. Either it returns a
`ValidatedTable` (numeric, one-hot encoded, ready to split) or it raises `CsvValidationError`
listing every problem found, each with file, row and column, so nothing trains on invalid data.

Conventions:
- Row numbers are 1-based lines of the file; the header is row 1, the first data row is row 2.
- The first row is the header. Extra columns not named in the schema are ignored. Blank lines
  (and rows whose fields are all empty) are skipped.
- A cell is missing when empty or one of `MISSING_TOKENS` (case-insensitive), e.g. `NA`, `NaN`, `?`.
- Types: ``float`` (finite number), ``int`` (integer, ``3.0`` accepted), ``bool`` (one of
  `TRUE_TOKENS` / `FALSE_TOKENS`), ``category`` (exactly one of the schema's `categories`,
  one-hot encoded in the schema's order as columns named ``<name>=<category>``).
- Missing values, by `missing_policy`: ``reject`` — every missing cell is an error;
  ``drop_row`` — rows with a missing value in an `allow_missing` column (or in the target) are
  dropped; ``impute_mean`` — missing cells of `allow_missing` columns stay NaN here and are
  filled with the site's train-split mean after the split. A column without `allow_missing`
  never accepts a missing cell, and the target is never imputed.
- Binary targets must be 0/1 (``true``/``false`` accepted) with both classes present; regression
  targets finite numbers.
- Numbers must be finite and at most `MAX_ABS_VALUE` in magnitude (larger ones overflow when
  standardised); a float/int column may declare a plausible `min`/`max` (e.g. age 0–120).
"""

from __future__ import annotations

import csv
import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from ..config import CsvColumnConfig, CsvSchemaConfig
from ..errors import ConfigError, DataValidationError

__all__ = [
    "CsvProblem",
    "CsvValidationError",
    "ValidatedTable",
    "check_csv_schema",
    "encoded_feature_names",
    "validate_site_csv",
]

COLUMN_TYPES = ("float", "int", "bool", "category")
TASK_TYPES = ("binary", "regression")
MISSING_POLICIES = ("reject", "drop_row", "impute_mean")
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
TRUE_TOKENS = frozenset({"1", "1.0", "true", "t", "yes", "y"})
FALSE_TOKENS = frozenset({"0", "0.0", "false", "f", "no", "n"})
MIN_USABLE_ROWS = 4  # a seeded train/test split and a train std need a few rows
MAX_PROBLEMS = 1000  # problems listed per file; the rest are counted
FLOAT32_MAX = float(np.finfo(np.float32).max)
# larger magnitudes overflow float64 when standardised (sums of squares over many rows): refused
MAX_ABS_VALUE = 1e100
HEADER_ROW = 1


@dataclass(frozen=True)
class CsvProblem:
    """One validation problem; `row` is None for whole-file problems, `column` None for whole-row ones."""

    file: str
    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.row is not None:
            where += f", row {self.row}"
        if self.column is not None:
            where += f", column {self.column!r}"
        return f"{where}: {self.message}"


class CsvValidationError(DataValidationError):
    """A site CSV (or several) failed validation; `issues` holds every `CsvProblem` found."""

    def __init__(self, issues: list[CsvProblem]) -> None:
        self.issues = list(issues)
        super().__init__([str(issue) for issue in self.issues])
        self.args = (f"{self.args[0]}\n  (rows are 1-based lines of the file; the header is row {HEADER_ROW})",)


@dataclass(frozen=True)
class ValidatedTable:
    """A site's table after validation: numeric features (NaN only where imputation will fill)."""

    path: Path
    feature_names: tuple[str, ...]  # encoded columns, category columns expanded
    features: np.ndarray  # float64 [n_rows, n_encoded]
    labels: np.ndarray  # float32 [n_rows]
    source_rows: np.ndarray  # int32 [n_rows], the file row (header = 1) each kept row came from
    rows_dropped: int  # rows dropped by missing_policy=drop_row

    @property
    def num_rows(self) -> int:
        return int(self.features.shape[0])


def encoded_feature_names(schema: CsvSchemaConfig) -> list[str]:
    names: list[str] = []
    for column in schema.features:
        if column.type == "category":
            names += [f"{column.name}={category}" for category in column.categories]
        else:
            names.append(column.name)
    return names


def check_csv_schema(schema: CsvSchemaConfig) -> None:
    """Raise `ConfigError` naming the `task.csv.*` key of the first inconsistency in the schema."""
    if schema.task_type not in TASK_TYPES:
        raise ConfigError("task.csv.task_type", f"unknown task type {schema.task_type!r}", f"use one of {TASK_TYPES}")
    if schema.missing_policy not in MISSING_POLICIES:
        raise ConfigError(
            "task.csv.missing_policy", f"unknown policy {schema.missing_policy!r}", f"use one of {MISSING_POLICIES}"
        )
    if not 0 < schema.test_fraction < 1:
        raise ConfigError("task.csv.test_fraction", f"must be in (0, 1), got {schema.test_fraction}")
    if schema.hidden_units < 0:
        raise ConfigError("task.csv.hidden_units", f"must be >= 0, got {schema.hidden_units}")
    if not schema.features:
        raise ConfigError("task.csv.features", "no feature columns listed", "list at least one {name, type}")
    seen: set[str] = set()
    for index, column in enumerate(schema.features):
        key = f"task.csv.features[{index}]"
        if column.name in seen or column.name == schema.target:
            raise ConfigError(f"{key}.name", f"column {column.name!r} is listed twice (or is the target)")
        seen.add(column.name)
        if column.type not in COLUMN_TYPES:
            raise ConfigError(f"{key}.type", f"unknown type {column.type!r} of {column.name!r}", f"use {COLUMN_TYPES}")
        categories = list(column.categories)
        if column.type == "category" and (not categories or len(set(categories)) != len(categories)):
            raise ConfigError(
                f"{key}.categories", f"category column {column.name!r} needs distinct categories, got {categories}"
            )
        if (column.min is not None or column.max is not None) and column.type not in ("float", "int"):
            raise ConfigError(f"{key}.min", f"a range applies to float and int columns, {column.name!r} is {column.type}")
        if column.min is not None and column.max is not None and column.min > column.max:
            raise ConfigError(f"{key}.max", f"max {column.max} of {column.name!r} is below its min {column.min}")


class _Problems:
    """The problems of one file, so each finding is one short `add(row, column, message)` call."""

    def __init__(self, file_name: str) -> None:
        self.file_name = file_name
        self.found: list[CsvProblem] = []
        self.more = 0  # problems beyond MAX_PROBLEMS: counted, not kept (a broken 200 MB file has millions)

    def add(self, row: int | None, column: str | None, message: str) -> None:
        if len(self.found) < MAX_PROBLEMS:
            self.found.append(CsvProblem(self.file_name, row, column, message))
        else:
            self.more += 1

    def error(self) -> CsvValidationError:
        extra = [CsvProblem(self.file_name, None, None, f"... and {self.more} more problem(s)")] if self.more else []
        return CsvValidationError(self.found + extra)

    def fail(self, message: str) -> CsvValidationError:
        return CsvValidationError([CsvProblem(self.file_name, None, None, message)])


def validate_site_csv(path: str | Path, schema: CsvSchemaConfig) -> ValidatedTable:
    """Parse and check one site's CSV; raise `CsvValidationError` with every problem found."""
    check_csv_schema(schema)
    path = Path(path)
    problems = _Problems(str(path))
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return _validate_stream(path, _numbered_records(handle), schema, problems)
    except FileNotFoundError:
        raise problems.fail("file not found — check task.csv.site_files or the site's data path") from None
    except UnicodeDecodeError as error:
        raise problems.fail(f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (OSError, csv.Error) as error:
        raise problems.fail(f"cannot be read as CSV: {error}") from None


def _validate_stream(
    path: Path, records: Iterator[tuple[int, list[str]]], schema: CsvSchemaConfig, problems: _Problems
) -> ValidatedTable:
    """One pass over the records; values go straight into typed arrays (8 bytes a number), so memory
    stays near the size of the numbers, not of Python lists of strings (~40x the file before)."""
    first = next(records, None)
    if first is None:
        raise problems.fail("file is empty: no header row and no data rows")
    header = [name.strip() for name in first[1]]
    positions = _header_positions(header, schema, problems)
    names = tuple(encoded_feature_names(schema))
    features, labels, source_rows = array("d"), array("f"), array("i")  # source rows: a file line number fits 32 bits
    rows_seen = rows_dropped = 0
    for row, record in records:
        rows_seen += 1
        if len(record) != len(header):
            problems.add(row, None, f"row has {len(record)} fields, the header has {len(header)}")
            continue
        problems_before = len(problems.found) + problems.more
        encoded: list[float] = []
        drop_row = False
        for column in schema.features:
            cells, missing = _parse_feature(row, column, record, positions, schema, problems)
            encoded += cells
            drop_row = drop_row or (missing and schema.missing_policy == "drop_row")
        label, label_missing = _parse_target(row, record, positions, schema, problems)
        if len(problems.found) + problems.more > problems_before:
            continue
        if drop_row or label_missing:
            rows_dropped += 1
            continue
        features.extend(encoded)
        labels.append(label)
        source_rows.append(row)
    if rows_seen == 0:
        problems.add(None, None, "file has a header but no data rows")
    if not problems.found and len(labels) < MIN_USABLE_ROWS:
        problems.add(None, None, f"only {len(labels)} usable rows ({rows_dropped} dropped), need {MIN_USABLE_ROWS}")
    if not problems.found and schema.task_type == "binary" and len(set(labels)) == 1:
        problems.add(
            None, schema.target,
            f"every usable row has target {int(labels[0])}: a binary model cannot learn from one class (is the file filtered?)",
        )  # fmt: skip
    if problems.found:
        raise problems.error()
    return ValidatedTable(
        path=path,
        feature_names=names,
        features=np.frombuffer(features, dtype=np.float64).reshape(len(labels), len(names)),
        labels=np.frombuffer(labels, dtype=np.float32),
        source_rows=np.frombuffer(source_rows, dtype=np.int32),
        rows_dropped=rows_dropped,
    )


def _numbered_records(handle: TextIO) -> Iterator[tuple[int, list[str]]]:
    """(file row, fields) of every non-blank record, one at a time; the row is the line where the record ends."""
    reader = csv.reader(handle)
    for record in reader:
        if any(field.strip() for field in record):
            yield reader.line_num, record


def _header_positions(header: list[str], schema: CsvSchemaConfig, problems: _Problems) -> dict[str, int]:
    positions: dict[str, int] = {}
    for position, name in enumerate(header):
        if name in positions:
            fields = f"fields {positions[name] + 1} and {position + 1}"
            problems.add(HEADER_ROW, name, f"the header names this column twice ({fields})")
        positions.setdefault(name, position)
    for name in [column.name for column in schema.features] + [schema.target]:
        if name not in positions:
            problems.add(HEADER_ROW, name, f"required column is missing from the header {header}")
    return positions


def _is_missing(cell: str) -> bool:
    return cell.strip().lower() in MISSING_TOKENS


def _parse_feature(
    row: int,
    column: CsvColumnConfig,
    record: list[str],
    positions: dict[str, int],
    schema: CsvSchemaConfig,
    problems: _Problems,
) -> tuple[list[float], bool]:
    """Encoded cells of one feature in one row, and whether the cell was (acceptably) missing."""
    width = len(column.categories) if column.type == "category" else 1
    if column.name not in positions:
        return [math.nan] * width, False  # reported once, at the header
    cell = record[positions[column.name]].strip()
    if _is_missing(cell):
        if not column.allow_missing:
            problems.add(row, column.name, f"missing value {cell!r}, the column has allow_missing: false")
        elif schema.missing_policy == "reject":
            problems.add(row, column.name, f"missing value {cell!r}, task.csv.missing_policy is 'reject'")
        return [math.nan] * width, True
    if column.type == "category":
        if cell not in column.categories:
            problems.add(row, column.name, f"unknown category {cell!r}, allowed: {list(column.categories)}")
            return [math.nan] * width, False
        return [1.0 if cell == category else 0.0 for category in column.categories], False
    value, problem = _parse_scalar(cell, column.type)
    if not problem and column.min is not None and value < column.min:
        problem = f"{cell} is below the plausible minimum {column.min:g} (the schema's min of {column.name!r})"
    if not problem and column.max is not None and value > column.max:
        problem = f"{cell} is above the plausible maximum {column.max:g} (the schema's max of {column.name!r})"
    if problem:
        problems.add(row, column.name, problem)
        return [math.nan], False
    return [value], False


def _parse_scalar(cell: str, kind: str) -> tuple[float, str]:
    """(value, "") or (nan, what is wrong) for a float, int or bool cell."""
    if kind == "bool":
        token = cell.lower()
        if token in TRUE_TOKENS:
            return 1.0, ""
        if token in FALSE_TOKENS:
            return 0.0, ""
        return math.nan, f"expected a bool (true/false, yes/no, 1/0), got {cell!r}"
    try:
        value = float(cell)
    except ValueError:
        return math.nan, f"expected {'an integer' if kind == 'int' else 'a number'}, got {cell!r}"
    if not math.isfinite(value):
        return math.nan, f"expected a finite number, got {cell!r}"
    if abs(value) > MAX_ABS_VALUE:
        return math.nan, f"{cell!r} is too large to standardise safely (|x| > {MAX_ABS_VALUE:g}); check the unit, or set min/max"
    if kind == "int" and not value.is_integer():
        return math.nan, f"expected an integer, got {cell!r}"
    return value, ""


def _parse_target(
    row: int, record: list[str], positions: dict[str, int], schema: CsvSchemaConfig, problems: _Problems
) -> tuple[float, bool]:
    """The row's label, and whether the row is to be dropped for a missing target."""
    if schema.target not in positions:
        return math.nan, False
    cell = record[positions[schema.target]].strip()
    if _is_missing(cell):
        if schema.missing_policy == "drop_row":
            return math.nan, True
        problems.add(row, schema.target, f"target is missing ({cell!r}); targets are never imputed")
        return math.nan, False
    if schema.task_type == "binary":
        value, problem = _parse_scalar(cell, "bool")
        if problem:
            problems.add(row, schema.target, f"target must be 0/1 (or true/false) for task_type binary, got {cell!r}")
        return value, False
    value, problem = _parse_scalar(cell, "float")
    if not problem and abs(value) > FLOAT32_MAX:  # labels are float32
        problem = f"{cell!r} is outside the float32 range of targets"
    if problem:
        problems.add(row, schema.target, f"target: {problem}")
    return value, False
