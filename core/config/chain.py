"""Schema of the `chain/` config group (authorization + data chains)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChainConfig:
    name: str = "none"  # none | embedded | anvil | rpc
