"""The vital-signs twin's figures: forecast error federated vs local vs pooled, and deterioration
detection of the twin vs NEWS2 vs both, without DP and with DP at ε = 3 — all in one run of this script.

    python -m medtwin.experiments.bench_vitals [--rounds 15] [--out .medtwin/bench/vitals]

Each setting is a real simulated federation (`simulate`: Flower simulation engine, the sites' own
policies and ledgers). Forecast MAE is on the pooled test patients in reference-scale units (and per
vital in its own unit); `naive` repeats each vital's last reading. Detection: the twin follows every
test patient with the final federated model; its alert threshold is calibrated to at most 1 false
alarm per patient-day on separate calibration patients (new patients of the same wards, generated
with another seed, seen by no model); NEWS2 is also scored at the threshold that gives the same
budget on those patients, so lead times compare at equal alarm burden. Every detection figure comes
with a 95 % patient-level bootstrap interval (`--resamples` draws of the test patients, seed 0), and
twin − NEWS2 AUROC with a paired one (core/tasks/vitals/bootstrap.py). Writes `<out>/vitals.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from medtwin.client.codec import PlainSiteCodec
from medtwin.core.artifacts import ArtifactStore
from medtwin.core.config import compose_config
from medtwin.core.protocol import record_from_bytes
from medtwin.core.rundir import atomic_write_text
from medtwin.core.tasks import VitalsTask, get_task
from medtwin.core.tasks.vitals import generate_site
from medtwin.core.tasks.vitals.bootstrap import DEFAULT_RESAMPLES, DetectionIntervals, detection_intervals
from medtwin.core.tasks.vitals.detection import calibrate_threshold, detector_outcomes, news2_score_of
from medtwin.core.tasks.vitals.twin import PatientTwin

from .simulate import simulate

WARNING_H, AFTER_H = 4.0, 2.0  # a cell is positive from 4 h before the labelled onset to 2 h after
FALSE_ALARMS_PER_DAY = 1.0  # fixed before looking at the held-out patients
CALIBRATION_SEED_OFFSET = 1000  # calibration patients: new patients of the same wards, seen by no model
BOOTSTRAP_SEED = 0
DP = ["privacy=dp", "privacy.target_epsilon=3.0"]  # ε per PATIENT (docs/VITALS.md)
SETTINGS = {
    "no DP": ["privacy=none"],
    "DP ε=3": DP,
    # the same recipe on wards 10x as large: per-patient DP noise shrinks with the patients per step
    "DP ε=3, 600 patients/ward": [*DP, "task.vitals.patients_per_site=600", "baselines.enabled=false"],
}


def recipe(out: Path, rounds: int, extra: list[str]) -> list[str]:
    return [
        "task=vitals", "strategy=fedavg_vitals", f"federation.num_rounds={rounds}", "baselines.epochs=10",
        "baselines.batch_size=64", "baselines.learning_rate=0.003", "progress=false", f"runs_dir={out / 'runs'}", *extra,
    ]  # fmt: skip


def final_model(task: VitalsTask, run_path: Path, seed: int) -> torch.nn.Module:
    summary = json.loads((run_path / "summary.json").read_text())
    aggregate = record_from_bytes(ArtifactStore(run_path / "artifacts").get(summary["final_aggregate_sha256"]))
    return task.model_with_weights(PlainSiteCodec().average(aggregate)[0], seed=seed)


def detection(task: VitalsTask, model: torch.nn.Module, *, resamples: int) -> tuple[dict[str, object], DetectionIntervals]:
    twin = PatientTwin(model, task.shape, grid_min=task.settings.grid_min)
    seed = task.config.split_seed + CALIBRATION_SEED_OFFSET
    calibration = [twin.follow(patient) for profile in task.profiles() for patient in generate_site(profile, seed=seed)]
    budget = dict(false_alarms_per_day=FALSE_ALARMS_PER_DAY, warning_h=WARNING_H, after_h=AFTER_H)
    threshold = calibrate_threshold(calibration, **budget)
    news2_matched = calibrate_threshold(calibration, **budget, score_of=news2_score_of)
    test = [twin.follow_gridded(patient) for ward in task.wards() for patient in ward.test]
    outcomes = detector_outcomes(test, twin_threshold=threshold, warning_h=WARNING_H, after_h=AFTER_H, news2_matched_threshold=news2_matched)
    intervals = detection_intervals(outcomes, resamples=resamples, seed=BOOTSTRAP_SEED)
    scored = {
        "calibration_patients": len(calibration),
        "test_patients": len(test),
        "reports": [outcome.report().to_dict() for outcome in outcomes],
        "intervals": intervals.to_dict(),
    }
    return scored, intervals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(".medtwin/bench/vitals"))
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap draws of the test patients")
    args = parser.parse_args()
    command = f"python -m medtwin.experiments.bench_vitals --rounds {args.rounds} --resamples {args.resamples}"
    results: dict[str, object] = {"command": command}
    for name, extra in SETTINGS.items():
        config = compose_config(recipe(args.out, args.rounds, [*extra, f"run_id=vitals-{int(time.time())}-{len(results)}"]))
        started = time.monotonic()
        run_path = simulate(config)
        summary = json.loads((run_path / "summary.json").read_text())
        rows = (summary.get("baselines") or {}).get("rows", {})
        task = get_task(config.task)
        assert isinstance(task, VitalsTask)
        model = final_model(task, run_path, config.seed)
        pooled = task.load_pooled()
        wall_time_s = time.monotonic() - started
        scored, intervals = detection(task, model, resamples=args.resamples)
        results[name] = {
            "run": str(run_path),
            "wall_time_s": wall_time_s,
            "forecast_mae_pooled_test": {row: values["pooled_test"] for row, values in rows.items()},
            "federated_metrics": task.evaluate(model, pooled.x_test, pooled.y_test),
            "epsilon": {site: values["epsilon"] for site, values in summary.get("privacy", {}).items()},
            "detection": scored,
        }
        print(json.dumps({name: results[name]}, indent=1, default=float))
        print(f"detection, {name}:\n{intervals.table()}")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "vitals.json", json.dumps(results, indent=1, default=float))
    print(f"wrote {args.out / 'vitals.json'}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
