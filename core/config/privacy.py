"""Schema of the `privacy/` config group (differential privacy at sites)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PrivacyConfig:
    name: str = "none"  # none | dp
