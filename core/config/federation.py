"""Schema of the `federation/` config group: rounds, deadlines and the simulation engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FederationConfig:
    num_rounds: int = 15
    min_sites: int = 1  # a round closes with fewer replies than this -> the run stops
    round_timeout_s: float = 600.0  # deadline for replies in one phase of a round
    client_num_cpus: float = 1.0  # Ray resources per virtual site (simulation)
    evaluate_every: int = 1  # federated evaluation every k rounds (and always after the last)
    # largest training-set size a site may claim: a site claiming more is rejected (it would own the
    # example-weighted average); sites also refuse certificates that exceed it
    max_site_examples: int = 1_000_000
