"""Split one pooled dataset's rows across synthetic sites: iid, label skew, quantity skew.

Pure numpy. Every scheme is deterministic given `seed`, returns disjoint index arrays that
together cover every row, and gives each site at least `min_samples_per_site` rows — or raises a
`ConfigError` naming the `task.partition.*` key to change.

- ``iid``: a seeded permutation cut into near-equal parts.
- ``dirichlet``: label skew (Hsu et al. 2019). For each class, site shares are drawn from
  Dirichlet(alpha, ..., alpha); small alpha concentrates a class on few sites. Regression labels
  (non-integer or many distinct values) are first binned into quantile bins. Draws that leave a
  site below the minimum are redrawn, up to `MAX_DIRICHLET_DRAWS` times.
- ``quantity``: site sizes skewed by lognormal(0, sigma) weights, labels iid. Every site first
  gets the minimum, the remaining rows are shared in proportion to the weights.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError, raise_config_errors

__all__ = ["PARTITION_SCHEMES", "label_groups", "partition_indices", "partition_problems"]

PARTITION_SCHEMES = ("iid", "dirichlet", "quantity")
MAX_DIRICHLET_DRAWS = 1000
MIN_ROWS_PER_SITE = 2  # one train and one test row
MAX_CLASS_LEVELS = 20  # integer labels with more distinct values than this are treated as regression


def partition_indices(
    labels: np.ndarray,
    *,
    num_sites: int,
    scheme: str,
    seed: int,
    dirichlet_alpha: float = 0.5,
    quantity_sigma: float = 1.0,
    min_samples_per_site: int = 10,
    regression_label_bins: int = 5,
) -> list[np.ndarray]:
    """Row indices (int64, ascending) of each of `num_sites` sites."""
    labels = np.asarray(labels).reshape(-1)
    num_rows = labels.shape[0]
    _check_arguments(num_rows, num_sites, scheme, dirichlet_alpha, quantity_sigma, min_samples_per_site)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(num_rows), num_sites)
    elif scheme == "quantity":
        parts = _quantity_skew(rng, num_rows, num_sites, quantity_sigma, min_samples_per_site)
    else:
        groups = label_groups(labels, num_bins=regression_label_bins)
        parts = _dirichlet_label_skew(rng, groups, num_sites, dirichlet_alpha, min_samples_per_site)
    return [np.sort(part).astype(np.int64) for part in parts]


def label_groups(labels: np.ndarray, *, num_bins: int) -> np.ndarray:
    """Class index of every row: the label itself for classes, a quantile bin for regression."""
    levels = np.unique(labels)
    is_integral = np.issubdtype(labels.dtype, np.integer) or bool(np.all(np.mod(labels, 1) == 0))
    if is_integral and len(levels) <= MAX_CLASS_LEVELS:
        return np.searchsorted(levels, labels)
    inner_edges = np.quantile(labels.astype(np.float64), np.linspace(0, 1, num_bins + 1)[1:-1])
    return np.digitize(labels, inner_edges)


def partition_problems(
    num_rows: int, num_sites: int, scheme: str, alpha: float, sigma: float, min_samples: int
) -> list[ConfigError]:
    """Every reason these settings cannot split `num_rows` rows, each naming its `task.*` key and fix."""
    problems = []
    if scheme not in PARTITION_SCHEMES:
        problems.append(ConfigError("task.partition.scheme", f"unknown scheme {scheme!r}", f"use one of {PARTITION_SCHEMES}"))
    if num_sites < 1:
        problems.append(ConfigError("task.num_sites", f"must be >= 1, got {num_sites}"))
    elif num_sites * MIN_ROWS_PER_SITE > num_rows:
        problems.append(ConfigError(
            "task.num_sites",
            f"{num_sites} sites cannot share {num_rows} rows: each needs at least {MIN_ROWS_PER_SITE} (a train and a test row)",
            f"set task.num_sites <= {num_rows // MIN_ROWS_PER_SITE}",
        ))  # fmt: skip
    if min_samples < 0:
        problems.append(ConfigError("task.partition.min_samples_per_site", f"must be >= 0, got {min_samples}"))
    elif num_sites >= 1 and num_sites * min_samples > num_rows:
        problems.append(ConfigError(
            "task.partition.min_samples_per_site",
            f"{num_sites} sites x {min_samples} rows each needs {num_sites * min_samples} rows, the dataset has {num_rows}",
            f"lower task.partition.min_samples_per_site to <= {num_rows // num_sites} or task.num_sites",
        ))  # fmt: skip
    if scheme == "dirichlet" and not (alpha > 0 and math.isfinite(alpha)):
        problems.append(ConfigError(
            "task.partition.dirichlet_alpha", f"must be a finite number > 0, got {alpha}",
            "set e.g. task.partition.dirichlet_alpha=0.5 (smaller = more label skew)",
        ))  # fmt: skip
    if scheme == "quantity" and not (sigma >= 0 and math.isfinite(sigma)):
        problems.append(ConfigError(
            "task.partition.quantity_sigma", f"must be a finite number >= 0, got {sigma}",
            "set e.g. task.partition.quantity_sigma=1.0 (0 = equal sizes)",
        ))  # fmt: skip
    return problems


def _check_arguments(
    num_rows: int, num_sites: int, scheme: str, alpha: float, sigma: float, min_samples: int
) -> None:
    raise_config_errors(partition_problems(num_rows, num_sites, scheme, alpha, sigma, min_samples))


def _quantity_skew(
    rng: np.random.Generator, num_rows: int, num_sites: int, sigma: float, min_samples: int
) -> list[np.ndarray]:
    weights = rng.lognormal(mean=0.0, sigma=sigma, size=num_sites)
    spare = num_rows - num_sites * min_samples
    shares = spare * weights / weights.sum()
    extra = np.floor(shares).astype(np.int64)
    # Largest remainder: the rows lost to flooring go to the sites with the biggest fractions.
    leftover = spare - int(extra.sum())
    extra[np.argsort(-(shares - extra), kind="stable")[:leftover]] += 1
    sizes = extra + min_samples
    return np.split(rng.permutation(num_rows), np.cumsum(sizes)[:-1])


def _dirichlet_label_skew(
    rng: np.random.Generator, groups: np.ndarray, num_sites: int, alpha: float, min_samples: int
) -> list[np.ndarray]:
    smallest = 0
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for group in np.unique(groups):
            rows = rng.permutation(np.flatnonzero(groups == group))
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(np.int64)
            for site, chunk in enumerate(np.split(rows, cuts)):
                parts[site].append(chunk)
        merged = [np.concatenate(chunks) for chunks in parts]
        smallest = min(len(part) for part in merged)
        if smallest >= min_samples:
            return merged
    raise ConfigError(
        "task.partition.dirichlet_alpha",
        f"{MAX_DIRICHLET_DRAWS} Dirichlet draws with alpha={alpha} over {num_sites} sites all left a site "
        f"with fewer than task.partition.min_samples_per_site={min_samples} rows (last draw: {smallest})",
        "raise task.partition.dirichlet_alpha, or lower task.partition.min_samples_per_site or task.num_sites",
    )
