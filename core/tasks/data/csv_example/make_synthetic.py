"""Regenerate the SYNTHETIC example site files: `python make_synthetic.py` (numpy, seed 2024).

Every value is made up by this script; no row describes a real person.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

SITES = {"site_a": (150, 58.0), "site_b": (100, 66.0), "site_c": (70, 52.0)}  # rows, mean age
HEADER = ["age", "sex", "systolic_bp", "heart_rate", "smoker", "readmitted"]


def make_site(rng: np.random.Generator, num_rows: int, mean_age: float) -> list[list[str]]:
    age = np.clip(rng.normal(mean_age, 12.0, num_rows), 18, 95).round()
    sex = rng.choice(["F", "M"], size=num_rows)
    systolic_bp = (110 + 0.5 * (age - 50) + rng.normal(0, 14, num_rows)).round()
    heart_rate = (72 + rng.normal(0, 11, num_rows)).round()
    smoker = rng.random(num_rows) < 0.25
    logit = -1.0 + 0.05 * (age - 60) + 0.03 * (systolic_bp - 125) + 0.03 * (heart_rate - 72) + 0.9 * smoker
    readmitted = rng.random(num_rows) < 1 / (1 + np.exp(-logit))
    missing_heart_rate = rng.random(num_rows) < 0.04  # a few blank cells, imputed with train means
    return [
        [
            f"{age[i]:.0f}",
            sex[i],
            f"{systolic_bp[i]:.0f}",
            "" if missing_heart_rate[i] else f"{heart_rate[i]:.0f}",
            "true" if smoker[i] else "false",
            str(int(readmitted[i])),
        ]
        for i in range(num_rows)
    ]


def main() -> None:
    rng = np.random.default_rng(2024)
    for site, (num_rows, mean_age) in SITES.items():
        with (Path(__file__).parent / f"{site}.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(HEADER)
            writer.writerows(make_site(rng, num_rows, mean_age))


if __name__ == "__main__":
    main()
