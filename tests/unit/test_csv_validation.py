"""validate_site_csv: every problem class is caught, and all problems of a file are reported at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medtwin.core.config import CsvColumnConfig, CsvSchemaConfig
from medtwin.core.errors import ConfigError, DataValidationError, MedtwinError
from medtwin.core.tasks import CsvValidationError, validate_site_csv

HEADER = "age,sex,systolic_bp,visits,smoker,readmitted\n"
GOOD_ROWS = "61,F,120,2,true,1\n45,M,135,0,false,0\n70,M,150,5,yes,1\n52,F,118,1,no,0\n"


def _schema(**overrides: object) -> CsvSchemaConfig:
    features = [
        CsvColumnConfig(name="age", type="float"),
        CsvColumnConfig(name="sex", type="category", categories=["M", "F"]),
        CsvColumnConfig(name="systolic_bp", type="float", allow_missing=True),
        CsvColumnConfig(name="visits", type="int"),
        CsvColumnConfig(name="smoker", type="bool"),
    ]
    return CsvSchemaConfig(features=features, target="readmitted", **overrides)  # type: ignore[arg-type]


def _write(tmp_path: Path, text: str, name: str = "site.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _issues(path: Path, schema: CsvSchemaConfig | None = None) -> set[tuple[int | None, str | None]]:
    with pytest.raises(CsvValidationError) as raised:
        validate_site_csv(path, schema or _schema())
    assert all(issue.file == str(path) for issue in raised.value.issues)
    assert str(path) in str(raised.value)
    return {(issue.row, issue.column) for issue in raised.value.issues}


def test_a_valid_file_is_encoded_with_the_schema_category_order(tmp_path: Path) -> None:
    table = validate_site_csv(_write(tmp_path, HEADER + GOOD_ROWS), _schema())
    assert table.feature_names == ("age", "sex=M", "sex=F", "systolic_bp", "visits", "smoker")
    np.testing.assert_array_equal(table.features[0], [61, 0, 1, 120, 2, 1])
    np.testing.assert_array_equal(table.features[2], [70, 1, 0, 150, 5, 1])
    np.testing.assert_array_equal(table.labels, [1, 0, 1, 0])
    np.testing.assert_array_equal(table.source_rows, [2, 3, 4, 5])
    assert table.features.dtype == np.float64 and table.labels.dtype == np.float32


def test_the_error_belongs_to_the_medtwin_hierarchy(tmp_path: Path) -> None:
    with pytest.raises(CsvValidationError) as raised:
        validate_site_csv(tmp_path / "absent.csv", _schema())
    assert isinstance(raised.value, DataValidationError) and isinstance(raised.value, MedtwinError)
    assert "header is row 1" in str(raised.value)


def test_missing_file(tmp_path: Path) -> None:
    assert _issues(tmp_path / "absent.csv") == {(None, None)}


@pytest.mark.parametrize(("text", "expected"), [("", "no header"), ("\n  \n", "no header"), (HEADER, "no data rows")])
def test_empty_file_or_header_only(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(CsvValidationError, match=expected):
        validate_site_csv(path, _schema())


def test_missing_columns_are_reported_at_the_header(tmp_path: Path) -> None:
    path = _write(tmp_path, "age,sex,systolic_bp,smoker\n61,F,120,true\n")
    assert _issues(path) == {(1, "visits"), (1, "readmitted")}


@pytest.mark.parametrize(
    ("column", "cell", "message"),
    [
        ("age", "abc", "expected a number, got 'abc'"),
        ("age", "inf", "finite"),
        ("visits", "2.5", "expected an integer, got '2.5'"),
        ("smoker", "maybe", "expected a bool"),
    ],
)
def test_wrong_type(tmp_path: Path, column: str, cell: str, message: str) -> None:
    row = {"age": "61", "sex": "F", "systolic_bp": "120", "visits": "2", "smoker": "true", "readmitted": "1"}
    row[column] = cell
    path = _write(tmp_path, HEADER + GOOD_ROWS + ",".join(row.values()) + "\n")
    with pytest.raises(CsvValidationError) as raised:
        validate_site_csv(path, _schema())
    [issue] = raised.value.issues
    assert (issue.row, issue.column) == (6, column) and message in issue.message


@pytest.mark.parametrize("cell", ["", "NaN", "NA", "?"])
def test_missing_value_where_not_allowed(tmp_path: Path, cell: str) -> None:
    path = _write(tmp_path, HEADER + f"{cell},F,120,2,true,1\n" + GOOD_ROWS)
    assert _issues(path) == {(2, "age")}


def test_missing_value_in_an_allow_missing_column_follows_the_policy(tmp_path: Path) -> None:
    path = _write(tmp_path, HEADER + GOOD_ROWS + "66,M,,3,false,1\n")
    assert _issues(path, _schema(missing_policy="reject")) == {(6, "systolic_bp")}
    dropped = validate_site_csv(path, _schema(missing_policy="drop_row"))
    assert dropped.num_rows == 4 and dropped.rows_dropped == 1 and 6 not in dropped.source_rows
    imputed = validate_site_csv(path, _schema(missing_policy="impute_mean"))
    assert imputed.num_rows == 5 and np.isnan(imputed.features[4, 3]) and not np.isnan(imputed.features[:4]).any()


def test_unknown_category(tmp_path: Path) -> None:
    path = _write(tmp_path, HEADER + GOOD_ROWS + "61,female,120,2,true,1\n")
    with pytest.raises(CsvValidationError, match=r"row 6, column 'sex': unknown category 'female'"):
        validate_site_csv(path, _schema())


@pytest.mark.parametrize("cell", ["2", "0.5", "yes please", ""])
def test_target_not_binary(tmp_path: Path, cell: str) -> None:
    path = _write(tmp_path, HEADER + GOOD_ROWS + f"61,F,120,2,true,{cell}\n")
    assert _issues(path) == {(6, "readmitted")}


def test_regression_target_accepts_numbers_and_rejects_text(tmp_path: Path) -> None:
    schema = _schema(task_type="regression")
    table = validate_site_csv(_write(tmp_path, HEADER + GOOD_ROWS.replace(",1\n", ",3.5\n")), schema)
    assert table.labels.tolist() == [3.5, 0.0, 3.5, 0.0]
    assert _issues(_write(tmp_path, HEADER + GOOD_ROWS + "61,F,120,2,true,high\n"), schema) == {(6, "readmitted")}


def test_wrong_field_count_and_duplicate_header(tmp_path: Path) -> None:
    assert _issues(_write(tmp_path, HEADER + GOOD_ROWS + "61,F,120\n")) == {(6, None)}
    duplicated = "age,age,sex,systolic_bp,visits,smoker,readmitted\n61,61,F,120,2,true,1\n"
    assert (1, "age") in _issues(_write(tmp_path, duplicated))


def test_every_problem_of_a_file_is_reported_at_once(tmp_path: Path) -> None:
    text = (
        HEADER
        + "61,F,120,2,true,1\n"  # row 2: fine
        + "abc,F,120,2,true,1\n"  # row 3: wrong type
        + ",X,120,2.5,true,1\n"  # row 4: missing age, unknown category, non-integer visits
        + "61,F,120,2,perhaps,7\n"  # row 5: bad bool and non-binary target
        + "52,M,118,1,no,0\n"  # row 6: fine
    )
    path = _write(tmp_path, text)
    with pytest.raises(CsvValidationError) as raised:
        validate_site_csv(path, _schema())
    expected = {(3, "age"), (4, "age"), (4, "sex"), (4, "visits"), (5, "smoker"), (5, "readmitted")}
    assert {(issue.row, issue.column) for issue in raised.value.issues} == expected
    assert len(raised.value.problems) == 6
    message = str(raised.value)
    for row, column in expected:
        assert f"{path}, row {row}, column {column!r}" in message


def test_too_few_usable_rows(tmp_path: Path) -> None:
    path = _write(tmp_path, HEADER + "61,F,120,2,true,1\n45,M,135,0,false,0\n")
    with pytest.raises(CsvValidationError, match="only 2 usable rows"):
        validate_site_csv(path, _schema())


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"task_type": "multiclass"}, "task.csv.task_type"),
        ({"missing_policy": "guess"}, "task.csv.missing_policy"),
        ({"test_fraction": 1.0}, "task.csv.test_fraction"),
    ],
)
def test_an_inconsistent_schema_is_a_config_error(tmp_path: Path, overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        validate_site_csv(_write(tmp_path, HEADER + GOOD_ROWS), _schema(**overrides))
    assert raised.value.key == key


def test_a_category_column_without_categories_is_a_config_error(tmp_path: Path) -> None:
    schema = CsvSchemaConfig(features=[CsvColumnConfig(name="sex", type="category")], target="readmitted")
    with pytest.raises(ConfigError, match=r"task\.csv\.features\[0\]\.categories"):
        validate_site_csv(_write(tmp_path, HEADER + GOOD_ROWS), schema)


def test_values_outside_a_columns_plausible_range_are_refused_with_row_and_column(tmp_path: Path) -> None:
    schema = _schema()
    schema.features[0] = CsvColumnConfig(name="age", type="float", min=0, max=120)
    path = _write(tmp_path, HEADER + GOOD_ROWS + "-40,F,120,2,true,1\n999999,M,130,1,no,0\n")
    with pytest.raises(CsvValidationError) as raised:
        validate_site_csv(path, schema)
    found = {(issue.row, issue.column): issue.message for issue in raised.value.issues}
    assert set(found) == {(6, "age"), (7, "age")}
    assert "below the plausible minimum 0" in found[(6, "age")] and "above the plausible maximum 120" in found[(7, "age")]


def test_an_overflow_prone_value_is_refused_not_silently_zeroed(tmp_path: Path) -> None:
    path = _write(tmp_path, HEADER + GOOD_ROWS + "1e308,F,120,2,true,1\n")
    with pytest.raises(CsvValidationError) as raised:
        validate_site_csv(path, _schema())
    [issue] = raised.value.issues
    assert (issue.row, issue.column) == (6, "age") and "too large to standardise" in issue.message


def test_a_single_class_binary_target_is_refused(tmp_path: Path) -> None:
    rows = "61,F,120,2,true,1\n45,M,135,0,false,1\n70,M,150,5,yes,1\n52,F,118,1,no,1\n"
    with pytest.raises(CsvValidationError) as raised:
        validate_site_csv(_write(tmp_path, HEADER + rows), _schema())
    [issue] = raised.value.issues
    assert issue.column == "readmitted" and "one class" in issue.message


@pytest.mark.parametrize(
    ("column", "key"),
    [(CsvColumnConfig(name="age", type="float", min=10, max=5), "max"), (CsvColumnConfig(name="age", type="bool", min=0), "min")],
)
def test_an_inconsistent_range_is_a_config_error(column: CsvColumnConfig, key: str) -> None:
    from medtwin.core.tasks.csv_validation import check_csv_schema

    schema = _schema()
    schema.features[0] = column
    with pytest.raises(ConfigError) as raised:
        check_csv_schema(schema)
    assert raised.value.key == f"task.csv.features[0].{key}"


def test_ingestion_streams_into_typed_arrays(tmp_path: Path) -> None:
    """Peak memory of validating a 5 MB file grows by a small multiple of its size (36x when every record
    was kept as Python strings); the ≤ 3x figure at 200 MB is measured by experiments/bench_csv.py."""
    from medtwin.experiments.bench_csv import measure, write_file

    path = tmp_path / "hospital.csv"
    write_file(path, 5)
    result = measure(path)
    assert result["rows"] > 200_000
    assert result["ratio"] < 6, result


def test_a_regression_target_beyond_float32_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, HEADER + GOOD_ROWS.replace(",1\n", ",1e50\n", 1))
    with pytest.raises(CsvValidationError) as raised:
        validate_site_csv(path, _schema(task_type="regression"))
    [issue] = raised.value.issues
    assert issue.column == "readmitted" and "float32" in issue.message
