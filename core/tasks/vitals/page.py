"""The twin's page in a run report: one held-out patient with an episode, followed by the final model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from .plot import plot_trace
from .twin import PatientTwin

if TYPE_CHECKING:
    from ..vitals_task import VitalsTask

__all__ = ["TWIN_PAGE", "twin_page"]

TWIN_PAGE = "twin-patient.png"


def twin_page(task: VitalsTask, model: nn.Module, path: Path) -> dict[str, Any]:
    """Plot the first held-out patient with a labelled episode (or the first one) and return the summary's `twin` block."""
    candidates = [patient for ward in task.wards() for patient in ward.test]
    patient = next((p for p in candidates if p.onset_h is not None), candidates[0])
    with np.errstate(all="ignore"):
        trace = PatientTwin(model, task.shape, grid_min=task.settings.grid_min).follow_gridded(patient)
    plot_trace(trace, path, title=f"patient {patient.patient_id} (held out)")
    return {
        "plot": path.name,
        "patient": patient.patient_id,
        "onset_h": patient.onset_h,
        "alerts": [
            {"start_h": a.start_h, "end_h": a.end_h, "news2": a.news2, "drivers": [name for name, share in a.drivers if share >= 0.2]}
            for a in trace.alerts
        ],
        "first_news2_5_h": float(trace.times_h[np.argmax(trace.news2 >= 5)]) if (trace.news2 >= 5).any() else None,
    }
