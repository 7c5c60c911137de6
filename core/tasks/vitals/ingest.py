"""A site's own vital-sign streams — long-format CSV or Parquet, or a FHIR R4 bundle — validated before use.

    patient_id,timestamp,signal,value
    p-0001,2026-03-01T08:00:00,hr,82
    p-0001,2026-03-01T08:00:00,spo2,97
    p-0001,2026-03-01T08:15:00,o2,1          # supplemental oxygen: 1 / 0
    p-0001,2026-03-01T08:15:00,avpu,A        # consciousness: A, C, V, P or U

Signals: hr, rr, spo2, sbp, temp, activity (units as in `UNITS`), o2, avpu. Timestamps are ISO 8601
(a timezone, if any, must be the same for a patient). A Parquet file has the same four columns
(timestamps a timestamp type, with or without a zone, or ISO text; values numbers or text, as avpu
is) and each of its rows meets exactly the checks of a CSV row (`parquet_rows` renders its cells as
the CSV's text). A CSV's rows are numbered as lines (the header is row 1), a Parquet file's from 1.
Every problem is collected — file, row, column, the value and the fix — and reported together
(`VitalsCsvError`, `VitalsParquetError`); nothing is returned from a file with a problem. Readings
of one patient need not share a cadence: they become one series on the union of their times, NaN
where a signal was not read, and `windows.grid_series` keeps the gaps. `read_streams` picks the
reader by suffix: `.csv`, `.parquet` or `.json` (FHIR R4).

`patient_id` must name the PERSON, not the stay or encounter: differential privacy protects one
unit, and a person under two ids is two units. Ids are compared after `patient_key` (Unicode NFKC,
trimmed, case-folded; a FHIR `Patient/<id>/_history/<n>` is `Patient/<id>`).
"""

from __future__ import annotations

import csv
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ...errors import MedtwinError
from .generator import SIGNALS, PatientSeries

__all__ = [
    "LOINC",
    "PLAUSIBLE_RANGE",
    "VitalsCsvError",
    "VitalsInputError",
    "VitalsParquetError",
    "patient_key",
    "read_fhir_bundle",
    "read_long_csv",
    "read_long_parquet",
    "read_streams",
]

COLUMNS = ("patient_id", "timestamp", "signal", "value")
# physiologically possible (not normal) values; outside = a unit mix-up or a broken sensor, refused
PLAUSIBLE_RANGE: dict[str, tuple[float, float]] = {
    "hr": (20.0, 250.0),
    "rr": (2.0, 70.0),
    "spo2": (40.0, 100.0),
    "sbp": (40.0, 280.0),
    "temp": (30.0, 43.5),
    "activity": (0.0, 1.0),
}
MAX_STAY_DAYS = 60  # one patient's stream spanning more is a typo (a wrong year), not a stay
UNIT_HINT = {"temp": "°C (a value in °F, e.g. 98.6, is out of range)", "spo2": "% (0.97 means a fraction: use 97)"}
MAX_PROBLEMS = 200


class VitalsInputError(MedtwinError):
    """A site's vital-sign file with problems: each one named (row or resource), nothing from the file used."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path, self.problems = path, problems
        shown = problems[:MAX_PROBLEMS]
        more = f"\n  … and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(f"{path}: {len(problems)} problem(s); nothing from this file is used:\n  " + "\n  ".join(shown) + more)


class VitalsCsvError(VitalsInputError):
    """Problems of a long-format CSV file."""


class VitalsParquetError(VitalsInputError):
    """Problems of a long-format Parquet file."""


@dataclass
class _Patient:
    readings: dict[datetime, dict[str, float | bool]]  # UTC-naive time -> signal -> value
    zoned: set[bool]  # whether the patient's timestamps carried an offset (they must agree)


def _add(patients: dict[str, _Patient], reading: tuple[str, datetime, str, float | bool], where: str, problems: list[str]) -> None:
    """File one reading; the same patient, time and signal charted twice with different values is an error."""
    patient_id, when, signal, value = reading
    patient = patients.setdefault(patient_id, _Patient({}, set()))
    patient.zoned.add(when.tzinfo is not None)
    try:
        moment = when.astimezone(timezone.utc).replace(tzinfo=None) if when.tzinfo is not None else when
    except (OverflowError, ValueError):
        problems.append(f"{where}: time {when.isoformat()} cannot be placed in UTC")
        return
    earlier = patient.readings.setdefault(moment, {}).get(signal)
    if earlier is not None and earlier != value:
        problems.append(f"{where}: patient {patient_id} has {signal} charted twice at {moment.isoformat()} with different values — keep one")
        return
    patient.readings[moment][signal] = value


def _finish(path: Path, patients: dict[str, _Patient], problems: list[str], site_id: str) -> list[PatientSeries]:
    for patient_id, patient in sorted(patients.items()):
        if len(patient.zoned) > 1:
            problems.append(f"patient {patient_id}: timestamps mix times with and without a UTC offset — give every time an offset, or none")
        elif patient.readings:
            span_days = (max(patient.readings) - min(patient.readings)).total_seconds() / 86400.0
            if span_days > MAX_STAY_DAYS:
                problems.append(f"patient {patient_id}: readings span {span_days:.0f} days (more than {MAX_STAY_DAYS}); a mistyped year?")
    if not patients and not problems:
        problems.append("no readings")
    if problems:
        raise VitalsInputError(path, problems)
    return [_series(patient_id, patient, site_id) for patient_id, patient in sorted(patients.items())]


def read_long_csv(path: str | Path, *, site_id: str) -> list[PatientSeries]:
    """Every patient's series from one long-format CSV file, or `VitalsCsvError` naming each bad row."""
    path = Path(path)
    problems: list[str] = []
    patients: dict[str, _Patient] = {}
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as error:
        raise VitalsCsvError(path, [f"cannot read it: {error.strerror or error}"]) from None
    row_number = 1
    try:
        with handle:
            reader = csv.DictReader(handle)
            missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
            if missing:
                raise VitalsCsvError(path, [f"header lacks column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}"])
            for row_number, row in enumerate(reader, start=2):
                _add_row(row, row_number, patients, problems)
    except UnicodeDecodeError as error:
        raise VitalsCsvError(path, [f"row {row_number + 1}: not UTF-8 text (byte {error.start}); save the file as UTF-8"]) from None
    except csv.Error as error:
        raise VitalsCsvError(path, [f"row {row_number + 1}: not readable CSV ({error})"]) from None
    try:
        return _finish(path, patients, problems, site_id)
    except VitalsInputError as error:
        raise VitalsCsvError(path, error.problems) from None


def read_long_parquet(path: str | Path, *, site_id: str) -> list[PatientSeries]:
    """Every patient's series from one long-format Parquet file, each row checked as a CSV row is,
    or `VitalsParquetError` naming each bad row and column (or what keeps the file from being read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .parquet_rows import batches, column_type_problems, text_rows

    path = Path(path)
    problems: list[str] = []
    patients: dict[str, _Patient] = {}
    try:
        handle = path.open("rb")
    except OSError as error:
        raise VitalsParquetError(path, [f"cannot read it: {error.strerror or error}"]) from None
    with handle:
        try:
            parquet = pq.ParquetFile(handle)
        except pa.ArrowException as error:
            fix = "write it with pyarrow's or pandas' to_parquet, or give the rows as a .csv file"
            raise VitalsParquetError(path, [f"not a Parquet file ({_first_line(error)}); {fix}"]) from None
        names = parquet.schema_arrow.names
        missing = [column for column in COLUMNS if column not in names]
        if missing:
            found = ", ".join(names[:20]) or "none"
            raise VitalsParquetError(path, [f"lacks column(s) {', '.join(missing)}; expected {','.join(COLUMNS)} (it has {found})"])
        unreadable = column_type_problems(parquet.schema_arrow)
        if unreadable:
            raise VitalsParquetError(path, unreadable)
        pending, first_row = batches(parquet), 1
        while True:
            try:
                rows = text_rows(next(pending))
            except StopIteration:
                break
            except (pa.ArrowException, OSError, OverflowError, ValueError) as error:
                fix = "a damaged file (write it again), or a time outside the years 1–9999"
                raise VitalsParquetError(path, [f"row {first_row} onwards: cannot be read ({_first_line(error)}); {fix}"]) from None
            for row_number, row in enumerate(rows, start=first_row):
                _add_row(row, row_number, patients, problems)
            first_row += len(rows)
    try:
        return _finish(path, patients, problems, site_id)
    except VitalsInputError as error:
        raise VitalsParquetError(path, error.problems) from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _add_row(row: dict[str, str | None], number: int, patients: dict[str, _Patient], problems: list[str]) -> None:
    """Check one long-format row — a CSV's or a Parquet file's, alike — and file its reading if it has no problem."""
    reading = _parse_row(row, number, problems)
    if reading is not None:
        _add(patients, reading, f"row {number}", problems)


def _check_value(signal: str, value: float, where: str, raw: object) -> str | None:
    low, high = PLAUSIBLE_RANGE[signal]
    if not np.isfinite(value) or not low <= value <= high:
        unit = UNIT_HINT.get(signal, "")
        return f"{where}: {signal} {raw} is outside {low:g}–{high:g}{' ' + unit if unit else ''}"
    return None


def patient_key(raw: str) -> str:
    """The id a patient is known by here: Unicode-normalised (NFKC), trimmed, case-folded. Ids that differ
    only in spelling are one patient — DP's unit is the person, and merging is the safe direction."""
    return unicodedata.normalize("NFKC", raw).strip().casefold()


def _parse_row(row: dict[str, str | None], number: int, problems: list[str]) -> tuple[str, datetime, str, float | bool] | None:
    patient_id = patient_key(row.get("patient_id") or "")
    signal = (row.get("signal") or "").strip().lower()
    raw_time, raw_value = (row.get("timestamp") or "").strip(), (row.get("value") or "").strip()
    where = f"row {number}"
    found: list[str] = []
    if not patient_id:
        found.append(f"{where}, column patient_id: empty — every reading needs its patient's id")
    try:
        when = datetime.fromisoformat(raw_time)
        if len(raw_time) <= 10:  # a date alone would read as midnight
            raise ValueError
    except ValueError:
        found.append(f"{where}, column timestamp: {raw_time!r} is not an ISO 8601 date and time (e.g. 2026-03-01T08:00:00)")
        when = datetime.min
    value: float | bool = 0.0
    known = (*SIGNALS, "o2", "avpu")
    if signal not in known:
        found.append(f"{where}, column signal: unknown signal {signal!r}; known: {', '.join(known)}")
    elif not raw_value:
        found.append(f"{where}, column value: empty — every {signal} reading needs its value")
    elif signal == "o2":
        if raw_value not in ("0", "1"):
            found.append(f"{where}, column value: o2 must be 1 (on supplemental oxygen) or 0, got {raw_value!r}")
        value = raw_value == "1"
    elif signal == "avpu":
        if raw_value.upper() not in ("A", "C", "V", "P", "U"):
            found.append(f"{where}, column value: avpu must be one of A, C, V, P, U, got {raw_value!r}")
        value = raw_value.upper() == "A"
    else:
        try:
            value = float(raw_value)
        except ValueError:
            found.append(f"{where}, column value: {signal} {raw_value!r} is not a number")
        else:
            problem = _check_value(signal, value, f"{where}, column value", raw_value)
            if problem:
                found.append(problem)
    problems.extend(found)
    return None if found else (patient_id, when, signal, value)


def _series(patient_id: str, patient: _Patient, site_id: str) -> PatientSeries:
    times = sorted(patient.readings)
    start = times[0]
    values = np.full((len(times), len(SIGNALS)), np.nan, np.float32)
    on_oxygen = np.zeros(len(times), bool)
    alert = np.ones(len(times), bool)
    oxygen_now, alert_now = False, True  # a state holds until the next charted one (air, alert until charted otherwise)
    for index, when in enumerate(times):
        readings = patient.readings[when]
        oxygen_now = bool(readings.get("o2", oxygen_now))
        alert_now = bool(readings.get("avpu", alert_now))
        on_oxygen[index], alert[index] = oxygen_now, alert_now
        for signal, value in readings.items():
            if signal in SIGNALS:
                values[index, SIGNALS.index(signal)] = float(value)
    return PatientSeries(
        patient_id=patient_id, site_id=site_id, cohort="unknown", age=float("nan"),
        times_h=np.array([(when - start).total_seconds() / 3600.0 for when in times]), values=values,
        on_oxygen=on_oxygen, alert=alert, onset_h=None, admit_clock_h=start.hour + start.minute / 60.0,
    )  # fmt: skip


# LOINC codes of the vital signs (FHIR vital-signs profile) -> (signal, {UCUM unit: conversion to ours})
LOINC: dict[str, tuple[str, dict[str, object]]] = {
    "8867-4": ("hr", {"/min": float, "{beats}/min": float}),
    "9279-1": ("rr", {"/min": float, "{breaths}/min": float}),
    "59408-5": ("spo2", {"%": float}),
    "2708-6": ("spo2", {"%": float}),
    "8480-6": ("sbp", {"mm[Hg]": float}),
    "8310-5": ("temp", {"Cel": float, "[degF]": lambda f: (f - 32.0) * 5.0 / 9.0}),
    "3151-8": ("o2", {"L/min": float}),  # inhaled oxygen flow rate: > 0 = on supplemental oxygen
}
BLOOD_PRESSURE_PANEL = "85354-9"  # systolic arrives as a component of this panel
USABLE_STATUS = ("final", "amended", "corrected")


def read_fhir_bundle(path: str | Path, *, site_id: str) -> list[PatientSeries]:
    """Every patient's series from a FHIR R4 Bundle of vital-sign Observations, mapped by LOINC code
    (units converted where UCUM says how, e.g. [degF] to Cel); `VitalsInputError` names each bad resource."""
    from fhir.resources.bundle import Bundle
    from pydantic import ValidationError

    path = Path(path)
    try:
        bundle = Bundle.model_validate_json(path.read_bytes())
    except OSError as error:
        raise VitalsInputError(path, [f"cannot read it: {error.strerror or error}"]) from None
    except ValidationError as error:  # where and what, never the offending value (it may be patient data)
        places = [f"{'.'.join(map(str, issue['loc']))}: {issue['msg']}" for issue in error.errors()[:20]]
        raise VitalsInputError(path, [f"not a valid FHIR R4 Bundle — {place}" for place in places]) from None
    problems: list[str] = []
    patients: dict[str, _Patient] = {}
    entries = bundle.entry or []
    # subjects may point at a Patient entry by its fullUrl (urn:uuid:…), as transaction bundles do
    full_urls = {
        str(entry.fullUrl): f"Patient/{entry.resource.id}"
        for entry in entries
        if entry.fullUrl and entry.resource is not None and entry.resource.get_resource_type() == "Patient" and entry.resource.id
    }
    for number, entry in enumerate(entries, start=1):
        resource = entry.resource
        where = f"entry {number} ({resource.get_resource_type() if resource else 'empty'}/{getattr(resource, 'id', None) or '?'})"
        if resource is None or resource.get_resource_type() != "Observation":
            continue  # Patients, Encounters, ... carry no readings
        if str(getattr(resource, "status", "")) not in USABLE_STATUS:
            continue  # entered-in-error, cancelled, preliminary: not a reading to learn from
        for reading in _observation_readings(resource, where, problems, full_urls):
            _add(patients, reading, where, problems)
    return _finish(path, patients, problems, site_id)


def _observation_readings(
    observation: object, where: str, problems: list[str], full_urls: dict[str, str]
) -> list[tuple[str, datetime, str, float | bool]]:
    subject = getattr(getattr(observation, "subject", None), "reference", None) or ""
    subject = full_urls.get(subject, subject).split("/_history/")[0]  # a versioned reference is the same patient
    when = getattr(observation, "effectiveDateTime", None)
    found: list[str] = []
    if not subject.startswith("Patient/") or not subject.removeprefix("Patient/"):
        found.append(f"{where}: subject {subject[:80]!r} is not a Patient reference (Patient/<id>, or the fullUrl of a Patient entry)")
    if not isinstance(when, datetime):
        found.append(f"{where}: effectiveDateTime is missing (a reading needs its time)")
    parts = [(observation, where)]
    codes = _codes(observation)
    if BLOOD_PRESSURE_PANEL in codes:
        parts = [(component, f"{where} component {index}") for index, component in enumerate(getattr(observation, "component", None) or [], 1)]
    readings = []
    for part, part_where in parts:
        known = [code for code in _codes(part) if code in LOINC]
        if not known:
            if BLOOD_PRESSURE_PANEL not in codes:  # a panel's diastolic component is simply not used
                found.append(f"{part_where}: no known LOINC code in {sorted(_codes(part)) or 'its code'}; known: {', '.join(LOINC)}")
            continue
        signal, units = LOINC[known[0]]
        quantity = getattr(part, "valueQuantity", None)
        unit = getattr(quantity, "code", None) or getattr(quantity, "unit", None)
        if quantity is None or quantity.value is None:
            found.append(f"{part_where}: {signal} has no valueQuantity")
            continue
        if unit not in units:
            found.append(f"{part_where}: {signal} in unit {unit!r}; expected UCUM {', '.join(units)}")
            continue
        value = float(units[unit](float(quantity.value)))  # type: ignore[operator]
        if signal == "o2":
            if not 0.0 <= value <= 60.0:
                found.append(f"{part_where}: inhaled oxygen flow {quantity.value} L/min is outside 0–60")
                continue
            readings.append((patient_key(subject.removeprefix("Patient/")), when, "o2", value > 0))
            continue
        problem = _check_value(signal, value, part_where, quantity.value)
        if problem:
            found.append(problem)
            continue
        readings.append((patient_key(subject.removeprefix("Patient/")), when, signal, value))
    problems.extend(found)
    return [] if found else readings


def _codes(element: object) -> set[str]:
    coding = getattr(getattr(element, "code", None), "coding", None) or []
    return {str(c.code) for c in coding if getattr(c, "system", "") in ("http://loinc.org", None) and c.code}


READERS = {".csv": read_long_csv, ".parquet": read_long_parquet, ".json": read_fhir_bundle}  # by file suffix


def read_streams(path: str | Path, *, site_id: str) -> list[PatientSeries]:
    """A site's streams by file type: long-format `.csv` or `.parquet`, or a FHIR R4 bundle `.json`."""
    path = Path(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        kind = repr(path.suffix) if path.suffix else "no suffix"
        raise VitalsInputError(path, [f"unknown file type ({kind}); give long-format .csv or .parquet, or a FHIR R4 bundle .json"])
    return reader(path, site_id=site_id)

