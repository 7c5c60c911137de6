"""Twin tasks: dataset loader + site split + model + loss + metrics, registered by name."""

from __future__ import annotations

from .base import SiteSplit, TwinTask, get_task, register_task, registered_tasks

__all__ = ["SiteSplit", "TwinTask", "get_task", "register_task", "registered_tasks"]
