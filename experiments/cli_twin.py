"""`medtwin twin follow`: one patient's vital-signs twin at the bedside, from a released model.

    medtwin model export <run> --site ward-a --out twin.pt              # the site's explicit release
    medtwin twin follow --model twin.pt --config runs/<run>/config.yaml --csv vitals.csv --patient p-0001 --plot p-0001.png
    medtwin twin follow --model twin.pt --config runs/<run>/config.yaml --generated ward-c:1:episode

The stream is a site's file — long-format CSV or Parquet, or a FHIR R4 bundle .json (see
`core/tasks/vitals/ingest.py`) — or a generated demo patient (`ward:index[:episode]`). Prints the
latest forecast with its band, every alert with the vitals that drove it and NEWS2 beside it;
`--json` for machines, `--plot` for one page a clinician can read.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()
twin_app = typer.Typer(no_args_is_help=True, help="A patient's vital-signs twin: forecast band, deviation alerts, NEWS2.")


def _patient(csv_path: Path | None, patient_id: str | None, generated: str | None, task):  # noqa: ANN001, ANN202
    from medtwin.core.tasks.vitals import generate_patient
    from medtwin.core.tasks.vitals.ingest import patient_key, read_streams

    if (csv_path is None) == (generated is None):
        raise typer.BadParameter("give the stream as --csv FILE --patient ID, or --generated WARD:INDEX[:episode]")
    if generated is not None:
        parts = generated.split(":")
        profiles = {profile.site_id: profile for profile in task.profiles()}
        if len(parts) not in (2, 3) or parts[0] not in profiles or not parts[1].isdigit() or parts[2:] not in ([], ["episode"]):
            raise typer.BadParameter(f"--generated {generated!r}: use WARD:INDEX[:episode] with WARD one of {', '.join(profiles)}")
        return generate_patient(profiles[parts[0]], int(parts[1]), seed=task.config.split_seed, has_episode=parts[2:] == ["episode"])
    patients = {patient.patient_id: patient for patient in read_streams(csv_path, site_id="bedside")}
    if patient_key(patient_id or "") not in patients:
        raise typer.BadParameter(f"--patient {patient_id!r} is not in {csv_path}; patients there: {', '.join(sorted(patients)[:20])}")
    return patients[patient_key(patient_id or "")]


@twin_app.command("follow")
def twin_follow_command(
    model_path: Annotated[Path, typer.Option("--model", help="state_dict written by `medtwin model export`")],
    config_path: Annotated[Path, typer.Option("--config", help="the run's config.yaml (task and window settings)")],
    csv_path: Annotated[Path | None, typer.Option("--csv", help="vital-sign streams: long-format .csv or .parquet, or FHIR .json")] = None,
    patient_id: Annotated[str | None, typer.Option("--patient", help="patient id in the --csv file")] = None,
    generated: Annotated[str | None, typer.Option("--generated", help="a generated demo patient, WARD:INDEX[:episode]")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="alert threshold of the deviation score")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="write the patient's page (PNG)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Follow one patient's stream with the twin: band, alerts (with their drivers) and NEWS2."""
    import numpy as np
    import torch

    from medtwin.core.config import config_from_yaml
    from medtwin.core.tasks import VitalsTask, get_task
    from medtwin.core.tasks.vitals.plot import plot_trace
    from medtwin.core.tasks.vitals.twin import DEFAULT_THRESHOLD, PatientTwin
    from medtwin.core.tasks.vitals.windows import FORECAST_SIGNALS

    config = config_from_yaml(config_path.read_text(encoding="utf-8"))
    task = get_task(config.task)
    if not isinstance(task, VitalsTask):
        raise typer.BadParameter(f"{config_path} is a {config.task.name} run, not a vitals twin")
    model = task.build_model()
    try:
        model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError, EOFError) as error:
        raise typer.BadParameter(f"--model {model_path}: not this task's released model ({str(error)[:200]})") from None
    twin = PatientTwin(model, task.shape, grid_min=task.settings.grid_min, threshold=DEFAULT_THRESHOLD if threshold is None else threshold)
    patient = _patient(csv_path, patient_id, generated, task)
    with np.errstate(all="ignore"):
        trace = twin.follow(patient)
    judged = np.flatnonzero(np.isfinite(trace.forecast[:, 0]))
    last = int(judged[-1]) if len(judged) else None
    result = {
        "patient": patient.patient_id,
        "hours": float(trace.times_h[-1]) if len(trace.times_h) else 0.0,
        "latest_forecast": None if last is None else {
            "at_h": float(trace.times_h[last]),
            **{name: {"forecast": float(trace.forecast[last, i]), "band": [float(trace.lower[last, i]), float(trace.upper[last, i])]}
               for i, name in enumerate(FORECAST_SIGNALS)},
        },
        "alerts": [
            {"start_h": a.start_h, "end_h": a.end_h, "news2": a.news2, "drivers": [{"vital": n, "share": s} for n, s in a.drivers]}
            for a in trace.alerts
        ],
        "max_news2": float(np.nanmax(trace.news2)) if len(trace.news2) else None,
    }  # fmt: skip
    if plot is not None:
        plot_trace(trace, plot, title=f"patient {patient.patient_id}")
    if as_json:
        console.print_json(json.dumps(result))
        return
    table = Table(title=f"patient {patient.patient_id}: {len(trace.alerts)} alert(s) over {result['hours']:.1f} h")
    for column in ("from (h)", "to (h)", "NEWS2", "driven by"):
        table.add_column(column)
    for alert in trace.alerts:
        drivers = ", ".join(f"{name} {share:.0%}" for name, share in alert.drivers if share >= 0.1)
        table.add_row(f"{alert.start_h:.2f}", f"{alert.end_h:.2f}", f"{alert.news2:.0f}", drivers)
    console.print(table)
    if result["latest_forecast"]:
        band = ", ".join(f"{n} {v['forecast']:.1f} [{v['band'][0]:.1f}–{v['band'][1]:.1f}]" for n, v in result["latest_forecast"].items() if n != "at_h")
        console.print(f"forecast for {result['latest_forecast']['at_h']:.2f} h: {band}")
    if plot is not None:
        console.print(f"page written to {plot}")
