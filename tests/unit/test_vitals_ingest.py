"""A site's own vital-sign streams (long-format CSV or Parquet, FHIR bundles): every broken row named, nothing kept from a broken file."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medtwin.core.tasks.vitals.ingest import VitalsCsvError, VitalsInputError, VitalsParquetError, read_long_csv, read_streams
from medtwin.core.tasks.vitals.windows import grid_series

GOOD = """patient_id,timestamp,signal,value
p1,2026-03-01T08:00:00,hr,82
p1,2026-03-01T08:00:00,spo2,97
p1,2026-03-01T08:05:00,hr,85
p1,2026-03-01T08:20:00,o2,1
p1,2026-03-01T08:40:00,hr,90
p1,2026-03-01T08:40:00,avpu,C
p2,2026-03-01T09:00:00,temp,37.9
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vitals.csv"
    path.write_text(text)
    return path


def test_irregular_readings_become_one_series_per_patient_with_gaps_kept(tmp_path: Path) -> None:
    p1, p2 = read_long_csv(write(tmp_path, GOOD), site_id="ward-x")
    assert (p1.patient_id, p2.patient_id) == ("p1", "p2") and p1.site_id == "ward-x"
    assert list(np.round(p1.times_h, 4)) == [0.0, round(5 / 60, 4), round(20 / 60, 4), round(40 / 60, 4)]
    assert np.isnan(p1.values[1, 3]) and p1.values[2, 0] != p1.values[2, 0]  # SpO2 not read at 08:05; no HR at 08:20
    assert list(p1.on_oxygen) == [False, False, True, True]  # oxygen holds until charted otherwise
    assert list(p1.alert) == [True, True, True, False]  # new confusion charted at 08:40
    gridded = grid_series(p1, grid_min=15.0)
    assert np.isnan(gridded.values[1, 0]) and not np.isnan(gridded.values[0, 0])  # 08:15–08:30 had no HR


def test_every_broken_row_is_named_with_its_column_and_fix(tmp_path: Path) -> None:
    broken = GOOD + "\n".join([
        "p3,yesterday,hr,80",  # row 9
        "p3,2026-03-01T08:00:00,heart,80",  # unknown signal
        "p3,2026-03-01T08:00:00,temp,98.6",  # Fahrenheit
        "p3,2026-03-01T08:00:00,spo2,0.97",  # a fraction
        "p3,2026-03-01T08:00:00,hr,abc",
        ",2026-03-01T08:00:00,hr,80",
        "p3,2026-03-01T08:00:00,o2,yes",
    ]) + "\n"  # fmt: skip
    with pytest.raises(VitalsCsvError) as raised:
        read_long_csv(write(tmp_path, broken), site_id="ward-x")
    problems = raised.value.problems
    assert len(problems) == 7
    assert problems[0].startswith("row 9, column timestamp: 'yesterday'")
    assert "unknown signal 'heart'" in problems[1] and "°F" in problems[2] and "fraction" in problems[3]
    assert "'abc' is not a number" in problems[4] and "column patient_id: empty" in problems[5] and "o2 must be 1" in problems[6]
    assert str(raised.value).startswith(f"{tmp_path / 'vitals.csv'}: 7 problem(s); nothing from this file is used")


def test_a_file_without_the_columns_is_refused_up_front(tmp_path: Path) -> None:
    with pytest.raises(VitalsCsvError, match="header lacks column"):
        read_long_csv(write(tmp_path, "id,time,value\n1,2,3\n"), site_id="ward-x")
    with pytest.raises(VitalsCsvError, match="cannot read it"):
        read_long_csv(tmp_path / "missing.csv", site_id="ward-x")


def observation(resource_id: str, patient: str, when: str, code: str, value: float, unit: str, *, components: list | None = None) -> dict:
    body = {
        "resourceType": "Observation", "id": resource_id, "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": when,
    }  # fmt: skip
    if components is not None:
        body["component"] = components
    else:
        body["valueQuantity"] = {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
    return {"resource": body}


def component(code: str, value: float, unit: str = "mm[Hg]") -> dict:
    return {"code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}}  # fmt: skip


def bundle(tmp_path: Path, entries: list[dict]) -> Path:
    import json

    path = tmp_path / "bundle.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}))
    return path


def test_a_fhir_bundle_maps_loinc_codes_converts_units_and_reads_blood_pressure_panels(tmp_path: Path) -> None:
    from medtwin.core.tasks.vitals.ingest import read_fhir_bundle

    entries = [
        {"resource": {"resourceType": "Patient", "id": "p1"}},
        observation("o1", "p1", "2026-03-01T08:00:00+00:00", "8867-4", 88, "/min"),
        observation("o2", "p1", "2026-03-01T08:00:00+00:00", "8310-5", 100.4, "[degF]"),  # converted to 38.0 °C
        observation("o3", "p1", "2026-03-01T10:15:00+02:00", "85354-9", 0, "", components=[component("8480-6", 118), component("8462-4", 76)]),
        observation("o4", "p1", "2026-03-01T08:30:00+00:00", "3151-8", 2, "L/min"),
    ]
    (patient,) = read_fhir_bundle(bundle(tmp_path, entries), site_id="ward-x")
    assert patient.patient_id == "p1" and list(np.round(patient.times_h, 3)) == [0.0, 0.25, 0.5]  # 10:15+02:00 is 08:15 UTC
    assert patient.values[0, 0] == 88 and abs(patient.values[0, 4] - 38.0) < 1e-4  # HR, temperature in °C
    assert patient.values[1, 3] == 118 and list(patient.on_oxygen) == [False, False, True]  # systolic from the panel


def test_every_bad_observation_is_named_by_its_resource(tmp_path: Path) -> None:
    from medtwin.core.tasks.vitals.ingest import VitalsInputError, read_fhir_bundle

    entries = [
        observation("hr-ok", "p1", "2026-03-01T08:00:00Z", "8867-4", 80, "/min"),
        observation("glucose", "p1", "2026-03-01T08:00:00Z", "2339-0", 5.4, "mmol/L"),  # not a vital sign we know
        observation("bp-kpa", "p1", "2026-03-01T08:00:00Z", "85354-9", 0, "", components=[component("8480-6", 16, "kPa")]),
        observation("spo2-frac", "p1", "2026-03-01T08:00:00Z", "59408-5", 0.97, "%"),
    ]
    with pytest.raises(VitalsInputError) as raised:
        read_fhir_bundle(bundle(tmp_path, entries), site_id="ward-x")
    problems = raised.value.problems
    assert len(problems) == 3
    assert "Observation/glucose" in problems[0] and "no known LOINC code" in problems[0]
    assert "Observation/bp-kpa" in problems[1] and "'kPa'" in problems[1] and "mm[Hg]" in problems[1]
    assert "Observation/spo2-frac" in problems[2] and "fraction" in problems[2]
    (tmp_path / "broken.json").write_text('{"resourceType": "Bundle", "type": "collection", "entry": 5}')
    with pytest.raises(VitalsInputError, match="not a valid FHIR R4 Bundle"):
        read_fhir_bundle(tmp_path / "broken.json", site_id="ward-x")


def test_conflicts_zone_mixes_typos_and_encodings_are_named_not_trained_on(tmp_path: Path) -> None:
    cases = {
        "p1,2026-03-01T08:00:00,hr,80\np1,2026-03-01T08:00:00,hr,140\n": "hr charted twice at 2026-03-01T08:00:00 with different values",
        "p1,2026-03-01T08:00:00,hr,80\np1,2026-03-01T09:00:00+01:00,hr,82\n": "mix times with and without a UTC offset",
        "p1,2026-03-01T08:00:00,hr,80\np1,2062-03-01T08:00:00,hr,82\n": "a mistyped year",
        "p1,2026-03-01,hr,80\n": "not an ISO 8601 date and time",
    }
    for rows, expected in cases.items():
        with pytest.raises(VitalsCsvError, match=expected):
            read_long_csv(write(tmp_path, "patient_id,timestamp,signal,value\n" + rows), site_id="ward-x")
    same = "p1,2026-03-01T08:00:00,hr,80\np1,2026-03-01T08:00:00,hr,80\n"  # an exact repeat is harmless
    assert read_long_csv(write(tmp_path, "patient_id,timestamp,signal,value\n" + same), site_id="ward-x")[0].values[0, 0] == 80
    (tmp_path / "latin1.csv").write_bytes("patient_id,timestamp,signal,value\nJosé,2026-03-01T08:00:00,hr,80\n".encode("latin-1"))
    with pytest.raises(VitalsCsvError, match="not UTF-8"):
        read_long_csv(tmp_path / "latin1.csv", site_id="ward-x")


def test_fhir_skips_retracted_readings_resolves_full_urls_and_refuses_negative_oxygen(tmp_path: Path) -> None:
    from medtwin.core.tasks.vitals.ingest import VitalsInputError, read_fhir_bundle

    retracted = observation("o2", "p1", "2026-03-01T08:15:00Z", "8867-4", 190, "/min")
    retracted["resource"]["status"] = "entered-in-error"
    by_url = observation("o3", "p1", "2026-03-01T08:30:00Z", "8867-4", 84, "/min")
    by_url["resource"]["subject"] = {"reference": "urn:uuid:patient-one"}
    entries = [
        {"fullUrl": "urn:uuid:patient-one", "resource": {"resourceType": "Patient", "id": "p1"}},
        observation("o1", "p1", "2026-03-01T08:00:00Z", "8867-4", 80, "/min"), retracted, by_url,
    ]  # fmt: skip
    (patient,) = read_fhir_bundle(bundle(tmp_path, entries), site_id="ward-x")
    assert list(patient.values[:, 0]) == [80, 84]  # the retracted 190 is not a reading
    with pytest.raises(VitalsInputError, match="oxygen flow -2"):
        read_fhir_bundle(bundle(tmp_path, [observation("o4", "p1", "2026-03-01T08:00:00Z", "3151-8", -2, "L/min")]), site_id="ward-x")


def parquet(tmp_path: Path, columns: dict[str, pa.Array | list]) -> Path:
    path = tmp_path / "vitals.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def csv_columns(text: str) -> dict[str, list[str]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    return {column: [row[column] for row in rows] for column in ("patient_id", "timestamp", "signal", "value")}


def assert_same_series(read: list, expected: list) -> None:
    assert [p.patient_id for p in read] == [p.patient_id for p in expected] and len(read) == len(expected)
    for mine, theirs in zip(read, expected):
        assert (mine.site_id, mine.admit_clock_h) == (theirs.site_id, theirs.admit_clock_h)
        np.testing.assert_array_equal(mine.times_h, theirs.times_h)
        np.testing.assert_array_equal(mine.values, theirs.values)  # NaN where the CSV has no reading, too
        assert list(mine.on_oxygen) == list(theirs.on_oxygen) and list(mine.alert) == list(theirs.alert)


def test_a_parquet_file_gives_the_series_of_its_csv_with_text_or_typed_columns(tmp_path: Path) -> None:
    expected = read_long_csv(write(tmp_path, GOOD), site_id="ward-x")
    assert_same_series(read_streams(parquet(tmp_path, csv_columns(GOOD)), site_id="ward-x"), expected)  # all text, avpu included
    numeric = GOOD.replace("p1,2026-03-01T08:40:00,avpu,C\n", "")  # a numeric value column holds no avpu letters
    zoned = numeric.replace(":00,", ":00+00:00,")
    columns = csv_columns(numeric)
    typed = {
        "patient_id": columns["patient_id"],
        "timestamp": pa.array(  # UTC nanoseconds: the 123 ns past each reading's second are not its time
            [int(datetime.fromisoformat(t).replace(tzinfo=timezone.utc).timestamp()) * 10**9 + 123 for t in columns["timestamp"]],
            pa.timestamp("ns", tz="UTC"),
        ),
        "signal": pa.array(columns["signal"]).dictionary_encode(),  # a pandas categorical
        "value": pa.array([float(v) for v in columns["value"]], pa.float32()),  # o2 1.0 is 1, temp 37.9 stays 37.9
    }
    assert_same_series(read_streams(parquet(tmp_path, typed), site_id="ward-x"), read_long_csv(write(tmp_path, zoned), site_id="ward-x"))


def test_every_broken_parquet_row_is_named_with_its_row_and_column_and_nothing_is_read(tmp_path: Path) -> None:
    columns = csv_columns(GOOD.replace("p1,2026-03-01T08:40:00,avpu,C\n", ""))  # rows 1-6
    broken = [("p3", "yesterday", "hr", 80.0), ("p3", "2026-03-01T08:00:00", "heart", 80.0),
              ("p3", "2026-03-01T08:00:00", "temp", 98.6), ("p3", "2026-03-01T08:00:00", "hr", None)]  # fmt: skip
    for row in broken:
        for column, cell in zip(columns, row):
            columns[column].append(cell)
    columns["value"] = pa.array([None if v is None else float(v) for v in columns["value"]], pa.float64())
    with pytest.raises(VitalsParquetError) as raised:
        read_streams(parquet(tmp_path, columns), site_id="ward-x")
    problems = raised.value.problems
    assert len(problems) == 4
    assert problems[0].startswith("row 7, column timestamp: 'yesterday' is not an ISO 8601")
    assert problems[1].startswith("row 8, column signal: unknown signal 'heart'")
    assert problems[2].startswith("row 9, column value: temp 98.6 is outside") and "°F" in problems[2]
    assert problems[3] == "row 10, column value: empty — every hr reading needs its value"
    assert str(raised.value).startswith(f"{tmp_path / 'vitals.parquet'}: 4 problem(s); nothing from this file is used")


def test_a_parquet_file_without_the_columns_or_their_types_is_refused_up_front(tmp_path: Path) -> None:
    columns = csv_columns(GOOD)
    with pytest.raises(VitalsParquetError, match=r"lacks column\(s\) signal; expected patient_id,timestamp,signal,value \(it has patient_id, timestamp, value\)"):
        read_streams(parquet(tmp_path, {name: cells for name, cells in columns.items() if name != "signal"}), site_id="ward-x")
    unreadable = dict(columns, value=pa.array([True] * len(columns["value"])), timestamp=pa.array([[1]] * len(columns["value"])))
    with pytest.raises(VitalsParquetError) as raised:
        read_streams(parquet(tmp_path, unreadable), site_id="ward-x")
    timestamp, value = raised.value.problems  # every column named at once
    assert timestamp.startswith("column timestamp: type list<") and "cannot be read" in timestamp and "ISO 8601 text" in timestamp
    assert value == "column value: type bool cannot be read as readings; write numbers, or text (avpu values are text: A, C, V, P, U)"


def test_a_file_named_parquet_that_is_not_one_or_of_an_unknown_type_is_refused(tmp_path: Path) -> None:
    (tmp_path / "vitals.parquet").write_text(GOOD)  # a CSV renamed
    with pytest.raises(VitalsParquetError, match="not a Parquet file") as raised:
        read_streams(tmp_path / "vitals.parquet", site_id="ward-x")
    assert str(raised.value).startswith(str(tmp_path / "vitals.parquet")) and "p1" not in str(raised.value)
    with pytest.raises(VitalsParquetError, match="cannot read it: No such file"):
        read_streams(tmp_path / "missing.parquet", site_id="ward-x")
    (tmp_path / "vitals.txt").write_text(GOOD)
    with pytest.raises(VitalsInputError, match=r"unknown file type \('.txt'\); give long-format .csv or .parquet"):
        read_streams(tmp_path / "vitals.txt", site_id="ward-x")


def test_one_person_spelled_two_ways_is_one_patient(tmp_path: Path) -> None:
    """DP's unit is the person: ids differing only in case, width or spaces must not become two units."""
    from medtwin.core.tasks.vitals.ingest import patient_key

    assert patient_key(" P-0001 ") == patient_key("p-0001") == patient_key("Ｐ-0001")  # full-width P
    path = tmp_path / "streams.csv"
    path.write_text(
        "patient_id,timestamp,signal,value\n"
        "P-0001,2026-03-01T08:00:00,hr,82\n"
        "p-0001,2026-03-01T08:15:00,hr,84\n"
        " p-0001,2026-03-01T08:30:00,rr,16\n"
    )
    (series,) = read_streams(path, site_id="s")
    assert series.patient_id == "p-0001" and len(series.times_h) == 3
