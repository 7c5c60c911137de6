"""Twin tasks: dataset loader + site split + model + loss + metrics, registered by name.

Importing this package registers every task: ``fed_heart_disease``, ``breast_cancer``,
``diabetes_progression``, ``csv`` and ``vitals``.
"""

from __future__ import annotations

from .base import SiteSplit, TwinTask, get_task, register_task, registered_tasks
from .csv_task import CsvTask, resolve_site_file
from .csv_validation import CsvProblem, CsvValidationError, ValidatedTable, validate_site_csv
from .fed_heart_disease import FedHeartDiseaseTask
from .partition import PARTITION_SCHEMES, partition_indices
from .preflight import check_task_data
from .sklearn_tasks import BreastCancerTask, DiabetesProgressionTask
from .vitals_task import VitalsTask

__all__ = [
    "PARTITION_SCHEMES",
    "BreastCancerTask",
    "CsvProblem",
    "CsvTask",
    "CsvValidationError",
    "DiabetesProgressionTask",
    "FedHeartDiseaseTask",
    "SiteSplit",
    "TwinTask",
    "ValidatedTable",
    "VitalsTask",
    "check_task_data",
    "get_task",
    "partition_indices",
    "register_task",
    "registered_tasks",
    "resolve_site_file",
    "validate_site_csv",
]
