"""Bring-your-own tabular data: task ``csv``, one CSV file per site, described by `task.csv`.

Every site file is checked by `validate_site_csv` before anything is split or trained; in a
simulation all files are checked first and every problem of every file is reported together.
Each site then splits its rows into train/test (`task.csv.test_fraction`, seed `task.split_seed`,
stratified for binary targets when both classes have more than 2 rows), fills `impute_mean` cells
with its train-split means and z-scores with its own train statistics (FLamby's convention).
Regression targets are left in the file's units.

Site file paths (`task.csv.site_files`, or a site's own data path) are resolved by
`resolve_site_file`: an absolute path is used as is; a relative path is taken relative to the
current working directory if that file exists, otherwise relative to the package data folder
`medtwin/core/tasks/data/` (so ``csv_example/site_a.csv`` finds the shipped synthetic example).
Site ids are the file names without extension (``site{i}`` if two files share a name).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from ..config import CsvSchemaConfig, TaskConfig
from ..errors import ConfigError
from .base import SiteSplit, TwinTask, register_task
from .csv_validation import (
    CsvProblem,
    CsvValidationError,
    ValidatedTable,
    check_csv_schema,
    encoded_feature_names,
    validate_site_csv,
)
from .federated_statistics import FeatureReference
from .models import FlatBCELoss, FlatMSELoss, mlp
from .preprocessing import pool_raw_splits, raw_site_split, standardise_split

__all__ = ["PACKAGE_DATA_DIR", "CsvTask", "resolve_site_file"]

PACKAGE_DATA_DIR = Path(__file__).parent / "data"


def resolve_site_file(path: str | Path) -> Path:
    """Absolute as is; relative: CWD if the file exists there, else the package data folder, else CWD."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    packaged = PACKAGE_DATA_DIR / candidate
    return packaged if packaged.exists() else candidate


@register_task("csv")
class CsvTask(TwinTask):
    name = "csv"
    normalization_modes = ("site", "federated")

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        if config.csv is None:
            raise ConfigError("task.csv", "task csv needs a schema", "set task.csv (see configs/task/csv_example.yaml)")
        self.schema: CsvSchemaConfig = config.csv
        check_csv_schema(self.schema)
        # a coordinator's config names no files (sites hold their own paths): only a simulation lists them
        if self.schema.site_files and config.num_sites != len(self.schema.site_files):
            raise ConfigError(
                "task.num_sites",
                f"is {config.num_sites} but task.csv.site_files lists {len(self.schema.site_files)} files",
                "list one file per site, or set task.num_sites to the number of files",
            )
        self.kind = self.schema.task_type
        self.primary_metric = "accuracy" if self.kind == "binary" else "mse"
        self.higher_is_better = self.kind == "binary"
        self.feature_names = tuple(encoded_feature_names(self.schema))

    def site_ids(self) -> list[str]:
        stems = [Path(path).stem for path in self.schema.site_files]
        if len(set(stems)) == len(stems):
            return stems
        return [f"site{index}" for index in range(len(stems))]

    def site_file(self, index: int) -> Path:
        return resolve_site_file(self.schema.site_files[index])

    def validate_all_sites(self) -> list[ValidatedTable]:
        """Validate every site file; one `CsvValidationError` lists the problems of all of them."""
        tables: list[ValidatedTable] = []
        problems: list[CsvProblem] = []
        for index in range(len(self.schema.site_files)):
            try:
                tables.append(validate_site_csv(self.site_file(index), self.schema))
            except CsvValidationError as error:
                problems += error.issues
        if problems:
            raise CsvValidationError(problems)
        return tables

    def split_table(self, table: ValidatedTable, *, site_id: str) -> SiteSplit:
        """A validated table's seeded train/test split, still raw (not imputed, not normalised)."""
        return raw_site_split(
            site_id,
            table.features,
            table.labels,
            binary=self.kind == "binary",
            test_fraction=self.schema.test_fraction,
            seed=self.config.split_seed,
            test_fraction_key="task.csv.test_fraction",
        )

    def load_site_file(self, path: str | Path, *, site_id: str, normalise: bool = True) -> SiteSplit:
        """A hospital's own file (e.g. its node_config data path), validated, split and (unless
        `normalise` is False, for `task.normalization=federated`) imputed and normalised."""
        table = validate_site_csv(resolve_site_file(path), self.schema)
        raw = self.split_table(table, site_id=site_id)
        return standardise_split(raw) if normalise else raw

    def load_site_unnormalised(self, index: int) -> SiteSplit:
        if not 0 <= index < len(self.schema.site_files):
            raise IndexError(f"site index {index} out of range 0..{len(self.schema.site_files) - 1}")
        return self.load_site_file(self.site_file(index), site_id=self.site_ids()[index], normalise=False)

    def feature_reference(self) -> FeatureReference:
        """Each numeric column's plausible range from the schema (`min`, `max`: required for
        `task.normalization=federated`, and every row is checked against it); bool and one-hot columns are [0, 1]."""
        low: list[float] = []
        high: list[float] = []
        missing = []
        for index, column in enumerate(self.schema.features):
            if column.type == "category":
                low += [0.0] * len(column.categories)
                high += [1.0] * len(column.categories)
            elif column.type == "bool":
                low.append(0.0)
                high.append(1.0)
            elif column.min is None or column.max is None or not column.min < column.max:
                missing.append(f"task.csv.features[{index}] ({column.name!r})")
            else:
                low.append(float(column.min))
                high.append(float(column.max))
        if missing:
            raise ConfigError(
                "task.normalization",
                f"federated normalisation encodes every numeric feature against its plausible range, and {', '.join(missing)} "
                "has no min < max",
                "give each numeric column `min` and `max` in task.csv.features, or set task.normalization=site",
            )
        return FeatureReference.from_bounds(np.asarray(low), np.asarray(high))

    def load_site(self, index: int) -> SiteSplit:
        if not 0 <= index < len(self.schema.site_files):
            raise IndexError(f"site index {index} out of range 0..{len(self.schema.site_files) - 1}")
        return self.load_site_file(self.site_file(index), site_id=self.site_ids()[index])

    def load_all_sites(self) -> list[SiteSplit]:
        tables = self.validate_all_sites()
        return [
            standardise_split(self.split_table(table, site_id=site_id))
            for table, site_id in zip(tables, self.site_ids(), strict=True)
        ]

    def load_pooled(self) -> SiteSplit:
        tables = self.validate_all_sites()
        raw = [self.split_table(table, site_id=site_id) for table, site_id in zip(tables, self.site_ids(), strict=True)]
        return standardise_split(pool_raw_splits(raw))

    def build_model(self) -> nn.Module:
        return mlp(
            len(self.feature_names), hidden_units=self.schema.hidden_units, sigmoid_output=self.kind == "binary"
        )

    def loss_fn(self) -> nn.Module:
        return FlatBCELoss() if self.kind == "binary" else FlatMSELoss()
