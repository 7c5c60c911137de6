"""Task problems are refused once, in the harness, before any party, site or Ray starts."""

from __future__ import annotations

import numpy as np
import pytest

from medtwin.core.config import compose_config
from medtwin.core.errors import ConfigError, ConfigErrors
from medtwin.core.tasks import check_task_data, sklearn_tasks
from medtwin.core.tasks.preprocessing import split_train_test
from medtwin.experiments import simulate as simulate_module


def test_unsatisfiable_partition_fails_once_before_any_site_or_ray(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    partitions = []
    real_partition = sklearn_tasks.partition_indices

    def counted_partition(*args, **kwargs):
        partitions.append(kwargs["num_sites"])
        return real_partition(*args, **kwargs)

    def no_parties(*args, **kwargs):
        raise AssertionError("parties were prepared (and Ray would start) despite an unsatisfiable partition")

    monkeypatch.setattr(sklearn_tasks, "partition_indices", counted_partition)
    monkeypatch.setattr(simulate_module, "prepare_parties", no_parties)
    config = compose_config(
        ["task=breast_cancer", "task.num_sites=32", "task.partition.dirichlet_alpha=0.05", f"runs_dir={tmp_path}", "progress=false"]
    )
    with pytest.raises(ConfigError) as refused:
        simulate_module.simulate(config)
    assert refused.value.key == "task.partition.dirichlet_alpha"
    message = str(refused.value)
    assert "alpha=0.05 over 32 sites" in message and "raise task.partition.dirichlet_alpha" in message
    assert partitions == [32]  # one partition attempt, in the harness: not one per site
    assert not any(tmp_path.iterdir())  # no run directory, no site files


def test_every_partition_setting_problem_is_named_together() -> None:
    config = compose_config(["task=breast_cancer", "task.num_sites=300", "task.partition.dirichlet_alpha=-1"])
    with pytest.raises(ConfigErrors) as refused:
        check_task_data(config.task)
    keys = {error.key for error in refused.value.errors}
    assert keys == {"task.num_sites", "task.partition.min_samples_per_site", "task.partition.dirichlet_alpha"}
    assert "set task.num_sites <= 284" in str(refused.value)  # 569 rows, 2 a site


def test_test_fraction_that_empties_a_side_names_the_key_and_the_site() -> None:
    config = compose_config(["task=breast_cancer", "task.partition.scheme=iid", "task.test_fraction=0.999"])
    with pytest.raises(ConfigError, match=r"site .site0.'s (\d+) rows leaves \1 test and 0 train") as refused:
        check_task_data(config.task)
    assert refused.value.key == "task.test_fraction"


def test_shipped_tasks_pass_the_preflight() -> None:
    for task in ("breast_cancer", "diabetes_progression", "fed_heart_disease", "csv_example"):
        check_task_data(compose_config([f"task={task}"]).task)


def test_a_test_side_smaller_than_the_classes_is_split_unstratified() -> None:
    labels = np.array([0] * 5 + [1] * 5)
    train, test = split_train_test(10, test_fraction=0.1, seed=0, stratify=labels)  # sklearn refuses it stratified
    assert len(test) == 1 and len(train) == 9
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(10))
