"""Fed-Heart-Disease follows FLamby's protocol exactly: sizes, positives, features, normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medtwin.core.config import TaskConfig
from medtwin.core.errors import ConfigError
from medtwin.core.tasks import FedHeartDiseaseTask, get_task
from medtwin.core.tasks.fed_heart_disease import DATA_DIR, FEATURE_NAMES

EXPECTED_SIZES = {"cleveland": (199, 104), "hungarian": (172, 89), "switzerland": (30, 16), "va": (85, 45)}
EXPECTED_TEST_POSITIVES = {"cleveland": 48, "hungarian": 33, "switzerland": 15, "va": 35}


@pytest.fixture(scope="module")
def task() -> FedHeartDiseaseTask:
    task = get_task(TaskConfig(name="fed_heart_disease"))
    assert isinstance(task, FedHeartDiseaseTask)
    return task


def test_site_ids_and_task_metadata(task: FedHeartDiseaseTask) -> None:
    assert task.site_ids() == ["cleveland", "hungarian", "switzerland", "va"]
    assert (task.kind, task.primary_metric, task.higher_is_better) == ("binary", "accuracy", True)


def test_split_sizes_and_test_positives_match_flamby(task: FedHeartDiseaseTask) -> None:
    for index, site_id in enumerate(task.site_ids()):
        site = task.load_site(index)
        assert site.site_id == site_id
        assert (site.num_train, site.num_test) == EXPECTED_SIZES[site_id]
        assert int(site.y_test.sum()) == EXPECTED_TEST_POSITIVES[site_id]
        assert set(np.unique(np.concatenate([site.y_train, site.y_test]))) <= {0.0, 1.0}
        assert site.x_train.dtype == np.float32 and site.y_train.dtype == np.float32


def test_thirteen_features_in_pandas_get_dummies_order(task: FedHeartDiseaseTask) -> None:
    assert len(FEATURE_NAMES) == 13
    assert FEATURE_NAMES[-5:] == ("cp_2", "cp_3", "cp_4", "restecg_1", "restecg_2")
    assert task.load_site(0).x_train.shape[1] == 13


def test_each_centre_is_z_scored_with_its_own_train_statistics(task: FedHeartDiseaseTask) -> None:
    for index in range(4):
        x_train = task.load_site(index).x_train.astype(np.float64)
        std = x_train.std(axis=0, ddof=1)
        varying = std > 1e-6
        np.testing.assert_allclose(x_train.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(std[varying], 1.0, atol=1e-4)
    # Switzerland writes chol = 0 on every row: a constant column stays 0 (std + 1e-9, no blow-up).
    switzerland = task.load_site(2)
    chol = FEATURE_NAMES.index("chol")
    assert np.all(switzerland.x_train[:, chol] == 0) and np.all(switzerland.x_test[:, chol] == 0)


def test_pooled_is_union_normalised_with_pooled_train_statistics(task: FedHeartDiseaseTask) -> None:
    pooled = task.load_pooled()
    assert (pooled.num_train, pooled.num_test) == (486, 254)
    assert int(pooled.y_test.sum()) == sum(EXPECTED_TEST_POSITIVES.values())
    np.testing.assert_allclose(pooled.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(pooled.x_train.std(axis=0, ddof=1), 1.0, atol=1e-4)


def test_loads_are_deterministic_and_the_split_follows_the_seed() -> None:
    first = get_task(TaskConfig(name="fed_heart_disease")).load_site(0)
    again = get_task(TaskConfig(name="fed_heart_disease")).load_site(0)
    np.testing.assert_array_equal(first.x_train, again.x_train)
    np.testing.assert_array_equal(first.y_test, again.y_test)
    other = get_task(TaskConfig(name="fed_heart_disease", split_seed=7)).load_site(0)
    assert (other.num_train, other.num_test) == (first.num_train, first.num_test)
    assert not np.array_equal(other.x_test, first.x_test)


def test_matches_a_pandas_reimplementation_of_flamby(task: FedHeartDiseaseTask) -> None:
    pd = pytest.importorskip("pandas")
    from sklearn.model_selection import train_test_split

    frames, centres, is_test = [], [], []
    for index, centre in enumerate(task.site_ids()):
        frame = pd.read_csv(DATA_DIR / f"processed.{centre}.data", header=None)
        frame = frame.replace("?", np.nan).drop([10, 11, 12], axis=1).dropna(axis=0).apply(pd.to_numeric)
        label = (frame.iloc[:, -1] > 0).astype(int).to_numpy()
        stratify = label if min(np.bincount(label)) > 2 else None
        _, test_rows = train_test_split(
            np.arange(len(frame)), test_size=1.0 - 0.66, train_size=0.66, random_state=43, stratify=stratify
        )
        frames.append(frame.iloc[:, :-1])
        centres += [index] * len(frame)
        is_test += list(np.isin(np.arange(len(frame)), test_rows))
    encoded = pd.get_dummies(pd.concat(frames, ignore_index=True), columns=[2, 6], drop_first=True)
    features = encoded.to_numpy().astype(np.float32)
    centres, is_test = np.array(centres), np.array(is_test)
    for index in range(4):
        train = features[(centres == index) & ~is_test].astype(np.float64)
        mean, std = train.mean(axis=0), train.std(axis=0, ddof=1)
        expected_test = (features[(centres == index) & is_test] - mean) / (std + 1e-9)
        np.testing.assert_allclose(task.load_site(index).x_test, expected_test, atol=1e-5)


def test_model_is_logistic_regression_and_loss_accepts_flat_labels(task: FedHeartDiseaseTask) -> None:
    model = task.build_model()
    assert isinstance(model[0], nn.Linear) and (model[0].in_features, model[0].out_features) == (13, 1)
    assert isinstance(model[1], nn.Sigmoid)
    site = task.load_site(0)
    output = model(torch.from_numpy(site.x_train[:5]))
    assert output.shape == (5, 1)
    loss = task.loss_fn()(output, torch.from_numpy(site.y_train[:5]))
    assert isinstance(task.loss_fn(), nn.BCELoss) and loss.shape == () and loss.item() > 0


def test_num_sites_other_than_four_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="task.num_sites"):
        get_task(TaskConfig(name="fed_heart_disease", num_sites=3))


def test_pooled_adam_baseline_lands_near_flamby_accuracy(task: FedHeartDiseaseTask) -> None:
    """FLamby's pooled baseline (Adam lr 1e-3, batch 4, 50 epochs) scores 0.795 on the pooled test set.

    About 6k tiny steps: ~2 s on an idle core (no timing assertion, the machine is shared).
    """
    pooled = task.load_pooled()
    x_train, y_train = torch.from_numpy(pooled.x_train), torch.from_numpy(pooled.y_train)
    torch.manual_seed(42)
    model, loss_fn = task.build_model(), task.loss_fn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(42)
    for _ in range(50):
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), 4):
            batch = order[start : start + 4]
            optimizer.zero_grad()
            loss_fn(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
    metrics = task.evaluate(model, pooled.x_test, pooled.y_test)
    assert 0.74 <= metrics["accuracy"] <= 0.85
    assert metrics["n"] == 254
