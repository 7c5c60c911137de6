"""Partitioners: disjoint, covering, deterministic, skewed when asked, minimum rows per site."""

from __future__ import annotations

import numpy as np
import pytest

from medtwin.core.errors import ConfigError
from medtwin.core.tasks import partition_indices

LABELS = np.repeat(np.arange(4), 150)  # 600 rows, 4 balanced classes
DEFAULTS = {"dirichlet_alpha": 0.5, "quantity_sigma": 1.0, "min_samples_per_site": 10}


def _partition(labels: np.ndarray = LABELS, **overrides: object) -> list[np.ndarray]:
    arguments = {"num_sites": 5, "scheme": "iid", "seed": 0, **DEFAULTS, **overrides}
    return partition_indices(labels, **arguments)  # type: ignore[arg-type]


def _label_skew(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean total-variation distance between each site's label mix and the global one."""
    levels = np.unique(labels)
    overall = np.array([np.mean(labels == level) for level in levels])
    site_mixes = [np.array([np.mean(labels[part] == level) for level in levels]) for part in parts]
    return float(np.mean([0.5 * np.abs(mix - overall).sum() for mix in site_mixes]))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_parts_are_disjoint_cover_every_row_and_respect_the_minimum(scheme: str) -> None:
    parts = _partition(scheme=scheme, min_samples_per_site=20)
    assert len(parts) == 5
    everything = np.concatenate(parts)
    assert len(everything) == len(LABELS) and len(np.unique(everything)) == len(LABELS)
    assert min(len(part) for part in parts) >= 20
    assert all(part.dtype == np.int64 and np.all(np.diff(part) > 0) for part in parts)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_same_seed_same_parts_different_seed_different_parts(scheme: str) -> None:
    first, again, other = _partition(scheme=scheme), _partition(scheme=scheme), _partition(scheme=scheme, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_gives_near_equal_sizes_and_mixes() -> None:
    parts = _partition(scheme="iid")
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert _label_skew(parts, LABELS) < 0.1


def test_small_dirichlet_alpha_skews_labels_far_more_than_iid() -> None:
    iid_skew = _label_skew(_partition(scheme="iid"), LABELS)
    skewed = _label_skew(_partition(scheme="dirichlet", dirichlet_alpha=0.1, min_samples_per_site=5), LABELS)
    mild = _label_skew(_partition(scheme="dirichlet", dirichlet_alpha=100.0), LABELS)
    assert skewed > 0.35 > 0.1 > iid_skew
    assert mild < skewed


def test_dirichlet_bins_regression_labels_into_quantiles() -> None:
    target = np.random.default_rng(3).normal(150.0, 70.0, size=400)
    parts = partition_indices(
        target, num_sites=4, scheme="dirichlet", seed=0, dirichlet_alpha=0.1, min_samples_per_site=10
    )
    assert sorted(np.concatenate(parts).tolist()) == list(range(400))
    site_means = [target[part].mean() for part in parts]
    assert max(site_means) - min(site_means) > 50  # label skew on the continuous target


def test_quantity_skew_gives_unequal_sizes_and_sigma_zero_equal_ones() -> None:
    sizes = sorted(len(part) for part in _partition(scheme="quantity", quantity_sigma=1.5))
    assert sizes[-1] >= 3 * sizes[0]
    even = [len(part) for part in _partition(scheme="quantity", quantity_sigma=0.0)]
    assert max(even) - min(even) <= 1


def test_impossible_minimum_names_the_config_key() -> None:
    with pytest.raises(ConfigError, match=r"task\.partition\.min_samples_per_site.*600"):
        _partition(num_sites=7, min_samples_per_site=100)


def test_dirichlet_that_cannot_meet_the_minimum_names_alpha() -> None:
    with pytest.raises(ConfigError, match=r"task\.partition\.dirichlet_alpha"):
        _partition(scheme="dirichlet", dirichlet_alpha=0.01, num_sites=10, min_samples_per_site=55)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"scheme": "zipf"}, "task.partition.scheme"),
        ({"scheme": "dirichlet", "dirichlet_alpha": 0.0}, "task.partition.dirichlet_alpha"),
        ({"scheme": "quantity", "quantity_sigma": -1.0}, "task.partition.quantity_sigma"),
        ({"num_sites": 0}, "task.num_sites"),
    ],
)
def test_bad_arguments_are_config_errors(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        _partition(**overrides)
    assert raised.value.key == key
