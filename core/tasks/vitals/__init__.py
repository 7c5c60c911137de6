"""Synthetic hospital vital signs (`generator`) and the NEWS2 early-warning score (`news2`).

See docs/VITALS.md. Both modules are numpy only; `model` and `windows` (the forecasting twin) are
imported from their own modules, not from this facade.
"""

from __future__ import annotations

from .generator import (
    COHORTS,
    MIN_HOURS_AFTER_ONSET_H,
    MIN_HOURS_BEFORE_ONSET_H,
    SIGNALS,
    UNITS,
    PatientSeries,
    SiteProfile,
    generate_patient,
    generate_site,
    site_profiles,
)
from .news2 import (
    NEWS2_PARAMETERS,
    news2_components,
    news2_for_patient,
    news2_missing_parameters,
    news2_risk,
    news2_score,
)

__all__ = [
    "COHORTS",
    "MIN_HOURS_AFTER_ONSET_H",
    "MIN_HOURS_BEFORE_ONSET_H",
    "NEWS2_PARAMETERS",
    "SIGNALS",
    "UNITS",
    "PatientSeries",
    "SiteProfile",
    "generate_patient",
    "generate_site",
    "news2_components",
    "news2_for_patient",
    "news2_missing_parameters",
    "news2_risk",
    "news2_score",
    "site_profiles",
]
