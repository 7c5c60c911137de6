"""Aggregation at the coordinator: it only ever sums site payloads, so encrypted schemes slot in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from flwr.app import ArrayRecord

from medtwin.core.protocol import sum_plain_updates


@dataclass(frozen=True)
class SiteUpdate:
    site_id: str
    node_id: int
    record: ArrayRecord


@dataclass(frozen=True)
class Rejection:
    site_id: str
    node_id: int
    reason: str
    server_round: int = 0


class Aggregator(Protocol):
    scheme: str

    def check(self, update: SiteUpdate) -> str | None:
        """None if the update is acceptable, else the reason it is rejected."""

    def aggregate(self, updates: list[SiteUpdate]) -> ArrayRecord:
        """The sum of the accepted updates, in the same payload format."""


class PlainAggregator:
    """Plaintext sum of [n_i * w_i ..., n_i] vectors (crypto=plain)."""

    scheme = "plain"

    def __init__(self) -> None:
        self.expected_shape: tuple[int, ...] | None = None

    def check(self, update: SiteUpdate) -> str | None:
        if "payload" not in update.record:
            return "update carries no `payload` array"
        shape = tuple(update.record["payload"].shape)
        if self.expected_shape is None:
            self.expected_shape = shape
        if shape != self.expected_shape:
            return f"update shape {shape} differs from the federation's {self.expected_shape}"
        return None

    def aggregate(self, updates: list[SiteUpdate]) -> ArrayRecord:
        return sum_plain_updates([update.record for update in updates])
