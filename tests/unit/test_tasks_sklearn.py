"""breast_cancer and diabetes_progression: synthetic sites, per-site z-scores, Opacus-ready models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medtwin.core.config import PartitionConfig, TaskConfig
from medtwin.core.tasks import BreastCancerTask, DiabetesProgressionTask, get_task, registered_tasks


def _config(name: str, scheme: str = "iid", **overrides: object) -> TaskConfig:
    return TaskConfig(name=name, num_sites=4, test_fraction=0.25, partition=PartitionConfig(scheme=scheme), **overrides)


def test_every_task_is_registered_on_package_import() -> None:
    assert {"fed_heart_disease", "breast_cancer", "diabetes_progression", "csv"} <= set(registered_tasks())
    assert isinstance(get_task(_config("breast_cancer")), BreastCancerTask)
    assert isinstance(get_task(_config("diabetes_progression")), DiabetesProgressionTask)


@pytest.mark.parametrize(("name", "rows", "features"), [("breast_cancer", 569, 30), ("diabetes_progression", 442, 10)])
@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_sites_cover_the_dataset_and_are_z_scored_per_site(name: str, rows: int, features: int, scheme: str) -> None:
    task = get_task(_config(name, scheme))
    sites = task.load_all_sites()
    assert [site.site_id for site in sites] == task.site_ids() == ["site0", "site1", "site2", "site3"]
    assert sum(site.num_train + site.num_test for site in sites) == rows
    for site in sites:
        assert site.x_train.shape[1] == features and site.x_train.dtype == np.float32
        assert site.num_test == int(np.ceil(0.25 * (site.num_train + site.num_test)))
        np.testing.assert_allclose(site.x_train.mean(axis=0), 0.0, atol=1e-4)
        np.testing.assert_allclose(site.x_train.std(axis=0, ddof=1), 1.0, atol=1e-3)
    pooled = task.load_pooled()
    assert pooled.num_train == sum(site.num_train for site in sites)
    np.testing.assert_allclose(pooled.x_train.mean(axis=0), 0.0, atol=1e-4)


@pytest.mark.parametrize("name", ["breast_cancer", "diabetes_progression"])
def test_same_seed_same_arrays_different_seed_different(name: str) -> None:
    first = get_task(_config(name, "dirichlet")).load_site(1)
    again = get_task(_config(name, "dirichlet")).load_site(1)
    other = get_task(_config(name, "dirichlet", split_seed=44)).load_site(1)
    np.testing.assert_array_equal(first.x_train, again.x_train)
    np.testing.assert_array_equal(first.y_test, again.y_test)
    assert first.x_train.shape != other.x_train.shape or not np.array_equal(first.x_train, other.x_train)


def test_diabetes_target_is_on_one_shared_o1_scale() -> None:
    task = get_task(_config("diabetes_progression"))
    assert (task.kind, task.primary_metric, task.higher_is_better) == ("regression", "mse", False)
    pooled = task.load_pooled()
    assert abs(float(pooled.y_train.mean())) < 1e-5 and abs(float(pooled.y_train.std(ddof=1)) - 1) < 1e-4
    # The same raw target value maps to the same scaled value at every site (one shared unit).
    site = task.load_site(0)
    assert np.isin(site.y_train, pooled.y_train).all()
    zero_model = nn.Sequential(nn.Linear(10, 1))
    nn.init.zeros_(zero_model[0].weight)
    nn.init.zeros_(zero_model[0].bias)
    assert 0.5 < task.evaluate(zero_model, pooled.x_test, pooled.y_test)["mse"] < 2.0


@pytest.mark.parametrize(("name", "hidden"), [("breast_cancer", 16), ("diabetes_progression", 32)])
def test_models_are_small_mlps_without_batchnorm_and_opacus_accepts_them(name: str, hidden: int) -> None:
    from opacus.validators import ModuleValidator

    task = get_task(_config(name))
    model = task.build_model()
    linears = [layer for layer in model if isinstance(layer, nn.Linear)]
    assert [layer.out_features for layer in linears] == [hidden, 1]
    assert not any(isinstance(layer, nn.modules.batchnorm._BatchNorm) for layer in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    site = task.load_site(0)
    output = model(torch.from_numpy(site.x_train))
    assert output.shape == (site.num_train, 1)
    assert task.loss_fn()(output, torch.from_numpy(site.y_train)).shape == ()


def test_breast_cancer_mlp_learns_on_pooled_data() -> None:
    task = get_task(_config("breast_cancer"))
    pooled = task.load_pooled()
    torch.manual_seed(0)
    model, loss_fn = task.build_model(), task.loss_fn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x_train, y_train = torch.from_numpy(pooled.x_train), torch.from_numpy(pooled.y_train)
    for _ in range(100):
        optimizer.zero_grad()
        loss_fn(model(x_train), y_train).backward()
        optimizer.step()
    assert task.evaluate(model, pooled.x_test, pooled.y_test)["accuracy"] > 0.93
