"""A live per-round progress display (rich) that degrades to log lines when there is no terminal."""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

logger = logging.getLogger("medtwin.coordinator")


class RoundProgress:
    def __init__(self, *, total_rounds: int, enabled: bool, primary_metric: str) -> None:
        self.total_rounds = total_rounds
        self.primary_metric = primary_metric
        console = Console(stderr=True)
        self.progress = (
            Progress(
                TextColumn("[bold]federated rounds"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
            if enabled and console.is_terminal
            else None
        )
        self.task_id = None

    def __enter__(self) -> RoundProgress:
        if self.progress is not None:
            self.progress.start()
            self.task_id = self.progress.add_task("rounds", total=self.total_rounds, status="starting")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def record(self, record: dict) -> None:
        if record["phase"] == "statistics":
            status = f"feature statistics of {len(record['participants'])} site(s) summed"
        elif record["phase"] == "train":
            status = f"round {record['round']}: {len(record['participants'])} site(s) aggregated"
            if record["rejected"]:
                status += f", {len(record['rejected'])} rejected"
        else:
            value = record["pooled"].get(self.primary_metric)
            status = f"round {record['round']}: pooled {self.primary_metric} {value:.4f}" if value is not None else "evaluated"
        logger.info(status)
        if self.progress is not None and self.task_id is not None:
            advance = 1 if record["phase"] == "train" else 0
            self.progress.update(self.task_id, advance=advance, status=status)
