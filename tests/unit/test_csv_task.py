"""Task `csv`: the shipped synthetic example loads and trains; broken files stop everything."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medtwin.core.config import CsvColumnConfig, CsvSchemaConfig, TaskConfig, compose_config
from medtwin.core.errors import ConfigError
from medtwin.core.tasks import CsvTask, CsvValidationError, get_task, resolve_site_file
from medtwin.core.tasks.csv_task import PACKAGE_DATA_DIR


@pytest.fixture(scope="module")
def example_config() -> TaskConfig:
    return compose_config(["task=csv_example"]).task


def test_example_config_composes_into_typed_schema(example_config: TaskConfig) -> None:
    assert example_config.name == "csv" and example_config.csv is not None
    assert isinstance(example_config.csv.features[1], CsvColumnConfig)
    assert example_config.csv.features[1].categories == ["F", "M"]


def test_example_sites_load_normalised_and_the_model_output_matches(example_config: TaskConfig) -> None:
    task = get_task(example_config)
    assert isinstance(task, CsvTask)
    assert task.site_ids() == ["site_a", "site_b", "site_c"]
    assert task.feature_names == ("age", "sex=F", "sex=M", "systolic_bp", "heart_rate", "smoker")
    sites = task.load_all_sites()
    assert [site.num_train + site.num_test for site in sites] == [150, 100, 70]
    for site in sites:
        assert not np.isnan(site.x_train).any() and not np.isnan(site.x_test).any()  # heart_rate imputed
        np.testing.assert_allclose(site.x_train.mean(axis=0), 0.0, atol=1e-4)
        model = task.build_model()
        output = model(torch.from_numpy(site.x_test))
        assert output.shape == (site.num_test, 1)
        assert task.loss_fn()(output, torch.from_numpy(site.y_test)).item() > 0
    assert (task.kind, task.primary_metric, task.higher_is_better) == ("binary", "accuracy", True)
    pooled = task.load_pooled()
    assert pooled.num_train == sum(site.num_train for site in sites)


def test_example_loads_are_deterministic_and_follow_the_seed(example_config: TaskConfig) -> None:
    first = get_task(example_config).load_site(0)
    again = get_task(example_config).load_site(0)
    other = get_task(replace(example_config, split_seed=5)).load_site(0)
    np.testing.assert_array_equal(first.x_train, again.x_train)
    assert not np.array_equal(first.y_test, other.y_test) or not np.array_equal(first.x_test, other.x_test)


def test_hidden_units_choose_the_model_and_regression_uses_mse(example_config: TaskConfig) -> None:
    assert example_config.csv is not None
    schema = replace(example_config.csv, hidden_units=8, task_type="regression", target="systolic_bp")
    schema.features = [column for column in schema.features if column.name != "systolic_bp"]
    task = get_task(replace(example_config, csv=schema))
    assert (task.kind, task.primary_metric, task.higher_is_better) == ("regression", "mse", False)
    assert isinstance(task.loss_fn(), nn.MSELoss)
    model = task.build_model()
    assert [layer.out_features for layer in model if isinstance(layer, nn.Linear)] == [8, 1]
    assert not isinstance(model[-1], nn.Sigmoid)
    site = task.load_site(1)
    assert model(torch.from_numpy(site.x_train)).shape == (site.num_train, 1)


def test_broken_files_in_a_simulation_are_all_reported_before_anything_loads(
    tmp_path: Path, example_config: TaskConfig
) -> None:
    assert example_config.csv is not None
    good = tmp_path / "site_a.csv"
    shutil.copy(PACKAGE_DATA_DIR / "csv_example" / "site_a.csv", good)
    broken = tmp_path / "site_b.csv"
    broken.write_text("age,sex,systolic_bp,heart_rate,smoker,readmitted\n61,X,120,70,true,1\n", encoding="utf-8")
    schema = replace(example_config.csv, site_files=[str(good), str(broken), str(tmp_path / "gone.csv")])
    task = get_task(replace(example_config, csv=schema))
    with pytest.raises(CsvValidationError) as raised:
        task.load_all_sites()
    reported = {(Path(issue.file).name, issue.row, issue.column) for issue in raised.value.issues}
    assert reported == {("site_b.csv", 2, "sex"), ("gone.csv", None, None)}
    with pytest.raises(CsvValidationError):
        task.load_pooled()
    assert task.load_site(0).num_train > 0  # the valid site alone still loads


def test_a_site_loads_its_own_file_by_path(tmp_path: Path, example_config: TaskConfig) -> None:
    own = tmp_path / "hospital.csv"
    shutil.copy(PACKAGE_DATA_DIR / "csv_example" / "site_c.csv", own)
    split = get_task(example_config).load_site_file(own, site_id="hospital")
    assert split.site_id == "hospital" and split.num_train + split.num_test == 70


def test_relative_paths_prefer_the_working_directory_then_package_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_site_file("csv_example/site_a.csv") == PACKAGE_DATA_DIR / "csv_example" / "site_a.csv"
    (tmp_path / "csv_example").mkdir()
    (tmp_path / "csv_example" / "site_a.csv").write_text("local copy", encoding="utf-8")
    assert resolve_site_file("csv_example/site_a.csv") == Path("csv_example/site_a.csv")
    assert resolve_site_file(tmp_path / "x.csv") == tmp_path / "x.csv"


def test_config_errors_name_the_key(example_config: TaskConfig) -> None:
    with pytest.raises(ConfigError) as raised:
        get_task(TaskConfig(name="csv"))
    assert raised.value.key == "task.csv"
    with pytest.raises(ConfigError) as raised:
        get_task(replace(example_config, num_sites=2))
    assert raised.value.key == "task.num_sites"
    schema = CsvSchemaConfig(site_files=["a.csv"], features=[CsvColumnConfig(name="age", type="date")], target="y")
    with pytest.raises(ConfigError) as raised:
        get_task(TaskConfig(name="csv", num_sites=1, csv=schema))
    assert raised.value.key == "task.csv.features[0].type"


def test_a_simulation_validates_every_csv_before_anything_starts(tmp_path) -> None:
    """With no baselines, crypto or chain, a broken hospital file is still reported up front, once, by file,
    row and column — not raised inside Ray round after round."""
    import pytest

    from medtwin.core.config import compose_config
    from medtwin.core.tasks import CsvValidationError
    from medtwin.experiments.simulate import simulate

    config = compose_config(["task=csv_example", "baselines.enabled=false", f"runs_dir={tmp_path / 'runs'}", "run_id=broken-csv"])
    broken = tmp_path / "broken.csv"
    source = Path(config.task.csv.site_files[0])
    if not source.is_absolute():
        from medtwin.core.tasks.csv_task import resolve_site_file

        source = resolve_site_file(source)
    lines = source.read_text().splitlines()
    lines[1] = ",".join(["abc"] * len(lines[1].split(",")))
    broken.write_text("\n".join(lines) + "\n")
    config.task.csv.site_files[0] = str(broken)
    with pytest.raises(CsvValidationError, match=str(broken)) as raised:
        simulate(config)
    assert any(issue.row == 2 for issue in raised.value.issues)
    assert not (tmp_path / "runs" / "broken-csv").exists()  # nothing started
