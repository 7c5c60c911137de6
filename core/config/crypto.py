"""Schema of the `crypto/` config group (how updates travel and are aggregated)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CryptoConfig:
    name: str = "plain"  # plain | ckks
