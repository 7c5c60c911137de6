"""Shared fixtures: offline Flower/Ray settings and a composed default config."""

from __future__ import annotations

import os

import pytest

for key, value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def default_config():
    from medtwin.core.config import compose_config

    return compose_config([])
