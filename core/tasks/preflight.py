"""Refuse a task's data problems once, before any site or Ray starts.

A simulated site builds its split when its ClientApp first runs: an unsatisfiable partition or a
test fraction that empties a site's side would otherwise fail at every site, after Ray started, once
per site. The harness builds every site's split here first, in its own process; each problem is a
`ConfigError` naming its `task.*` key and the fix (several partition problems come together as
`ConfigErrors`; a CSV site's rows as one `CsvValidationError`).
"""

from __future__ import annotations

from ..config import TaskConfig
from .base import get_task

__all__ = ["check_task_data"]


def check_task_data(config: TaskConfig) -> None:
    """Build every site's train/test split as the sites will; raise the first task problem found."""
    task = get_task(config)  # checks of the task itself: fed_heart_disease's 4 centres, a CSV schema
    task.load_all_sites()  # partition (sklearn tasks), per-site split, every CSV row validated
