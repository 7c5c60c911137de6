"""Each task composes with its own default recipe; the sweep plugins' configs compose with our tree."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from medtwin.core.config import compose_config, register_schemas
from medtwin.core.config.compose import CONFIG_MODULE, check_override, group_options

# task option -> (local optimiser, learning rate, batch size) of its default recipe
DEFAULT_RECIPES = {
    "fed_heart_disease": ("sgd", 0.01, 4),  # strategy/fedavg_tuned.yaml
    "vitals": ("adam", 0.003, 64),  # strategy/fedavg_vitals.yaml
    "breast_cancer": ("sgd", 0.03, 16),  # strategy/fedavg_breast_cancer.yaml
    "diabetes_progression": ("sgd", 0.003, 4),  # strategy/fedavg_diabetes_progression.yaml
    "csv_example": ("sgd", 0.1, 4),  # strategy/fedavg_csv_example.yaml
}


@pytest.mark.parametrize("task", sorted(DEFAULT_RECIPES))
def test_a_task_brings_its_own_recipe_and_strategy_still_overrides_it(task: str) -> None:
    recipe = compose_config([f"task={task}"]).strategy
    assert (recipe.optimizer, recipe.learning_rate, recipe.batch_size) == DEFAULT_RECIPES[task]
    flamby = compose_config([f"task={task}", "strategy=fedavg"]).strategy
    assert (flamby.optimizer, flamby.learning_rate, flamby.batch_size) == ("sgd", 0.001, 4)
    tuned_further = compose_config([f"task={task}", "strategy.learning_rate=0.5"]).strategy
    assert (tuned_further.optimizer, tuned_further.learning_rate) == (DEFAULT_RECIPES[task][0], 0.5)


def _hydra_config(overrides: list[str]):
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_joblib_launcher_and_recipe_search_sweeper_compose_with_our_tree() -> None:
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason='pip install -e ".[sweep]"')
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason='pip install -e ".[sweep]"')
    composed = _hydra_config(["hydra/launcher=joblib", "hydra/sweeper=recipe_search", "task=breast_cancer"])
    assert composed.hydra.launcher._target_.endswith("JoblibLauncher")
    sweeper = composed.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert {"strategy.optimizer", "strategy.learning_rate", "strategy.batch_size"} <= set(sweeper.params)
    for key, space in sweeper.params.items():
        check_override(f"{key}={space}")  # every tuned key exists in the schema


def test_the_ray_launcher_composes_with_jobs_that_hold_no_cpu() -> None:
    """hydra/launcher=ray_cluster: Hydra's Ray launcher, each job a Ray task taking no CPU itself (its
    simulation's hospitals are Ray actors on the same cluster; a job holding a CPU starves them)."""
    import hydra_plugins.hydra_ray_launcher  # noqa: F401 - the sweep extra; a missing plugin fails here

    composed = _hydra_config(["hydra/launcher=ray_cluster", "task=breast_cancer"])
    assert composed.hydra.launcher._target_.endswith("RayLauncher")
    assert composed.hydra.launcher.ray.remote.num_cpus == 0
    address = _hydra_config(["hydra/launcher=ray_cluster", "hydra.launcher.ray.init.address=auto"]).hydra.launcher.ray.init.address
    assert address == "auto"  # another machine's cluster: one override


def test_every_shipped_task_has_a_default_recipe_listed_here() -> None:
    assert set(group_options("task")) == set(DEFAULT_RECIPES)


def test_the_sweep_objective_is_the_federated_model_on_the_pooled_test_set(tmp_path) -> None:
    from medtwin.core.rundir import RunDirectory
    from medtwin.experiments.run import primary_result

    summary_file = RunDirectory(tmp_path, "run-a").path / "summary.json"
    summary = {"primary_metric": "accuracy", "final_metrics": {"pooled": {"accuracy": 0.78}}}
    summary_file.write_text(json.dumps(summary))
    assert primary_result(tmp_path / "run-a") == pytest.approx(0.78)  # no baselines: the sites' pooled evaluation
    rows = {"federated": {"pooled_test": 0.986, "mean_of_sites": 0.75}, "pooled": {"pooled_test": 0.97}}
    summary_file.write_text(json.dumps({**summary, "baselines": {"metric": "accuracy", "rows": rows}}))
    assert primary_result(tmp_path / "run-a") == pytest.approx(0.986)  # the figure compared with local and pooled
