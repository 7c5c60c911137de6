"""Membership-inference audit of the FINAL federated model: does it give its training patients away?

    python -m medtwin.experiments.mia_audit [--tasks fed_heart_disease breast_cancer] [--epsilons 8 3 1]
        [--seeds 42] [--reference-models 8] [--rounds N] [--override key=value ...]
        [--out .medtwin/bench/mia.json] [--keep-runs DIR]
    python -m medtwin.experiments.mia_audit --run-dir runs/<run-id> [...]   # audit finished runs only

A researcher's tool in simulation: it holds every site's rows, as the harness does. For each task, ε
(no DP, then each of --epsilons) and seed it runs one real federated simulation (`simulate`, crypto
plain, no chain), decodes the run's final aggregate, and attacks it with

- the loss-threshold attack (Yeom et al. 2018), and
- offline LiRA (Carlini et al. 2022) with --reference-models reference federations: the run's own
  FedAvg recipe (rounds, local steps, batch, optimizer, learning rate, FedProx mu, and under DP the
  noise multiplier each site recorded and the clipping norm), replayed in-process on random halves
  of each site's rows. LiRA rather than a plain difficulty-calibrated loss: it calibrates each
  patient's difficulty (a patient whose outcome is atypical has a high loss in or out of training)
  and it scales the confidence on the logit, where it is close to Gaussian (see `mia_attacks`).

Members are each site's training rows (`task.load_site`: exactly the rows, and the normalisation,
the site trained with); non-members its held-out test rows; the audit draws as many members as there
are non-members at each site. Utility is the final model on the union of the sites' test rows (each
as its site holds it): accuracy and AUROC, and the accuracy points lost against no DP (same task and
seed). Only aggregate numbers are written (JSON + a printed table): never a row, a loss or a score.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medtwin.client.privacy.dp_training import train_locally_dp
from medtwin.client.training import train_locally
from medtwin.core.config import MedtwinConfig, compose_config, config_from_yaml
from medtwin.core.errors import ConfigError
from medtwin.core.model_vector import model_to_vector
from medtwin.core.rundir import RunDirectory, atomic_write_text, json_safe
from medtwin.core.tasks import CsvTask, SiteSplit, TwinTask, VitalsTask, get_task

from .federation_setup import SimulatedFederation, site_kit_dir
from .mia_attacks import (
    attack_auc,
    balanced_membership_rows,
    lira_offline_scores,
    loss_threshold_scores,
    reference_keep_matrix,
)

logger = logging.getLogger("medtwin")

DEFAULT_OUT = Path(".medtwin/bench/mia.json")
DEFAULT_OVERRIDES = ("strategy=fedavg_tuned", "crypto=plain", "chain=none", "progress=false", "baselines.enabled=false")
AIM = {"max_epsilon": 3.0, "max_attack_auc": 0.55, "max_accuracy_lost_points": 2.0}

# A reference trainer: each site's (features, labels) and a seed -> a model trained like the target.
ReferenceTrainer = Callable[[list[tuple[np.ndarray, np.ndarray]], int], nn.Module]


@dataclass(frozen=True)
class MembershipPool:
    """Every site's rows as that site holds them, which are training rows, and which are audited."""

    features: np.ndarray  # float32 [n, d]
    labels: np.ndarray  # float32 [n]
    site: np.ndarray  # int [n], the site index of each row
    is_member: np.ndarray  # bool [n]: a training row of its site
    audited: np.ndarray  # bool [n]: in the balanced member / non-member set

    @classmethod
    def from_sites(cls, sites: list[SiteSplit], *, seed: int) -> MembershipPool:
        blocks = []
        for index, split in enumerate(sites):
            audited_train = np.zeros(split.num_train, dtype=bool)
            audited_train[balanced_membership_rows(split.num_train, split.num_test, seed=seed + index)] = True
            blocks.append((
                np.concatenate([split.x_train, split.x_test]),
                np.concatenate([split.y_train, split.y_test]),
                np.full(split.num_train + split.num_test, index),
                np.arange(split.num_train + split.num_test) < split.num_train,
                np.concatenate([audited_train, np.ones(split.num_test, dtype=bool)]),
            ))  # fmt: skip
        return cls(*(np.concatenate(column) for column in zip(*blocks, strict=True)))

    def site_rows(self, mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(features, labels) of the rows in `mask`, one pair per site, in site order."""
        return [
            (self.features[mask & (self.site == index)], self.labels[mask & (self.site == index)])
            for index in range(int(self.site.max()) + 1)
        ]


def signed_logits(model: nn.Module, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """phi = log(p_true / (1 - p_true)) per row, from the pre-sigmoid output when the model ends in one
    (exact even where the probability rounds to 0 or 1)."""
    model.eval()
    with torch.no_grad():
        inputs = torch.from_numpy(np.ascontiguousarray(features))
        if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Sigmoid):
            logits = model[:-1](inputs).reshape(-1).double().numpy()
        else:
            probability = np.clip(model(inputs).reshape(-1).double().numpy(), 1e-12, 1 - 1e-12)
            logits = np.log(probability) - np.log1p(-probability)
    return np.where(np.asarray(labels) >= 0.5, logits, -logits)


def audit_model(
    target: nn.Module,
    sites: list[SiteSplit],
    *,
    train_reference: ReferenceTrainer,
    reference_models: int,
    seed: int = 0,
) -> dict[str, dict]:
    """Both attacks on `target`, trained on `sites`' training rows: AUC with a 95% bootstrap interval."""
    pool = MembershipPool.from_sites(sites, seed=seed)
    audited = pool.audited
    target_phi = signed_logits(target, pool.features, pool.labels)
    losses = np.logaddexp(0.0, -target_phi)  # binary cross-entropy, from phi
    keep = reference_keep_matrix(len(pool.labels), reference_models=reference_models, seed=seed)
    reference_phi = np.stack([
        signed_logits(train_reference(pool.site_rows(keep[index]), seed + 1000 * (index + 1)), pool.features, pool.labels)
        for index in range(reference_models)
    ])  # fmt: skip
    lira = lira_offline_scores(target_phi[audited], reference_phi[:, audited], keep[:, audited])
    is_member = pool.is_member[audited]
    return {
        "loss_threshold": asdict(attack_auc(loss_threshold_scores(losses[audited]), is_member, seed=seed)),
        "lira_offline": asdict(attack_auc(lira, is_member, seed=seed)) | {"reference_models": reference_models},
    }


def fedavg_reference_trainer(
    task: TwinTask, config: MedtwinConfig, *, noise_multipliers: list[float] | None
) -> ReferenceTrainer:
    """The run's recipe replayed in-process: from the run's public seeded initial model, every round each
    site trains `strategy.local_steps` steps (DP-SGD with its recorded noise multiplier when given) and
    the models are averaged weighted by rows, as FedAvg does."""
    strategy = config.strategy

    def train(site_rows: list[tuple[np.ndarray, np.ndarray]], seed: int) -> nn.Module:
        torch.manual_seed(config.seed)
        weights = model_to_vector(task.build_model())
        for round_index in range(config.federation.num_rounds):
            weighted_sum, rows = np.zeros_like(weights), 0
            for site_index, (features, labels) in enumerate(site_rows):
                if len(labels) == 0:
                    continue
                local = task.model_with_weights(weights, seed=config.seed)
                recipe = {
                    "loss_fn": task.loss_fn(), "local_steps": strategy.local_steps, "batch_size": strategy.batch_size,
                    "optimizer_name": strategy.optimizer, "learning_rate": strategy.learning_rate,
                    "proximal_mu": strategy.proximal_mu, "seed": seed + 100 * round_index + site_index,
                }  # fmt: skip
                if noise_multipliers is None:
                    train_locally(local, features, labels, **recipe)
                else:
                    train_locally_dp(
                        local, features, labels, **recipe, noise_multiplier=noise_multipliers[site_index],
                        max_grad_norm=config.privacy.max_grad_norm, grad_sample_mode=config.privacy.grad_sample_mode,
                    )  # fmt: skip
                weighted_sum += len(labels) * model_to_vector(local)
                rows += len(labels)
            weights = weighted_sum / rows
        return task.model_with_weights(weights, seed=config.seed)

    return train


def auditable_task(config: MedtwinConfig) -> TwinTask:
    task = get_task(config.task)
    if task.kind != "binary" or isinstance(task, (CsvTask, VitalsTask)):
        raise ConfigError(
            "task.name",
            f"the membership audit needs a built-in binary task with one row per patient; got {config.task.name!r}",
            "audit a fed_heart_disease or breast_cancer run",
        )
    return task


def recorded_noise_multipliers(run_dir: RunDirectory, site_ids: list[str]) -> list[float]:
    """Each site's DP noise multiplier as it reported it in its first training round (metrics.jsonl)."""
    found: dict[str, float] = {}
    for record in run_dir.read_metrics():
        if record.get("phase") == "train":
            for site_id, figures in record.get("sites", {}).items():
                if "unsigned.noise_multiplier" in figures:
                    found.setdefault(site_id, float(figures["unsigned.noise_multiplier"]))
    missing = [site_id for site_id in site_ids if site_id not in found]
    if missing:
        raise ValueError(f"{run_dir.metrics_path}: no noise multiplier recorded for {missing} in a DP run")
    return [found[site_id] for site_id in site_ids]


def final_model(run_path: Path) -> tuple[MedtwinConfig, nn.Module]:
    """The run's config and its final model: the last aggregate, decoded as a site decodes it (and under
    a server optimiser, stepped as the sites step it)."""
    from .simulate import final_weights  # imports Flower; only needed once a run exists

    config_path = run_path / "config.yaml"
    if not (run_path / "summary.json").is_file() or not config_path.is_file():
        raise FileNotFoundError(f"{run_path} is not a finished run directory (needs config.yaml and summary.json)")
    config = config_from_yaml(config_path.read_text(encoding="utf-8"))
    config.runs_dir = str(run_path.parent)
    task = auditable_task(config)
    run_dir = RunDirectory(run_path.parent, run_path.name)
    kits = {site_id: site_kit_dir(config, site_id) for site_id in task.site_ids()}
    federation = SimulatedFederation(root=run_path, kit_dirs=kits)
    weights = final_weights(config, run_dir, federation, run_dir.read_summary()["final_aggregate_sha256"])
    return config, task.model_with_weights(weights, seed=config.seed)


UTILITY_VIEWS = ("pooled_test", "sites_test")
UTILITY_METRICS = ("accuracy", "auroc")


def final_utility(task: TwinTask, model: nn.Module, sites: list[SiteSplit]) -> dict[str, dict[str, float]]:
    """Accuracy and AUROC on all test rows, two ways: `pooled_test` normalised with pooled-train
    statistics (the baselines' pooled-test column in BENCHMARKS.md), and `sites_test` with each row as
    its site holds it (what the sites' own evaluation sees; exact AUROC over the union)."""
    pooled = task.load_pooled()
    views = {
        "pooled_test": (pooled.x_test, pooled.y_test),
        "sites_test": (np.concatenate([site.x_test for site in sites]), np.concatenate([site.y_test for site in sites])),
    }
    return {
        view: {metric: task.evaluate(model, features, labels)[metric] for metric in (*UTILITY_METRICS, "n")}
        for view, (features, labels) in views.items()
    }


def audit_run(run_path: Path, *, reference_models: int, seed: int = 0) -> dict:
    """One row of the audit: the run's privacy, its final model's utility, and both attacks' AUC."""
    config, model = final_model(run_path)
    task = auditable_task(config)
    sites = task.load_all_sites()
    run_dir = RunDirectory(run_path.parent, run_path.name)
    summary = run_dir.read_summary()
    dp = config.privacy.name == "dp"
    noise = recorded_noise_multipliers(run_dir, task.site_ids()) if dp else None
    trainer = fedavg_reference_trainer(task, config, noise_multipliers=noise)
    utility = final_utility(task, model, sites)
    spent = [figures["epsilon"] for figures in summary["privacy"].values() if figures.get("epsilon") is not None]
    return {
        "task": config.task.name,
        "seed": config.seed,
        "run_id": summary["run_id"],
        "rounds": summary["rounds_completed"],
        "target_epsilon": config.privacy.target_epsilon if dp else None,
        "epsilon_spent_max_site": max(spent) if spent else None,
        "noise_multipliers": noise,
        "utility": utility,
        "attacks": audit_model(model, sites, train_reference=trainer, reference_models=reference_models, seed=seed),
    }


def simulate_setting(task_name: str, epsilon: float | None, seed: int, *, runs_root: Path, overrides: list[str]) -> Path:
    """One real federated simulation in its own folder (its sites' privacy ledgers start empty)."""
    from .simulate import simulate

    folder = runs_root / f"{task_name}-eps-{epsilon if epsilon is not None else 'none'}-seed-{seed}"
    if folder.exists():
        raise FileExistsError(f"{folder} exists: its sites' privacy ledgers would carry over; pass an empty --keep-runs")
    privacy = ["privacy=none"] if epsilon is None else ["privacy=dp", f"privacy.target_epsilon={epsilon}"]
    chosen = [*DEFAULT_OVERRIDES, f"task={task_name}", f"seed={seed}", f"runs_dir={folder / 'runs'}", *privacy, *overrides]
    by_key = {override.split("=", 1)[0]: override for override in chosen}  # a later override of a key wins
    return simulate(compose_config(list(by_key.values())))


def add_utility_lost(rows: list[dict]) -> None:
    """Points lost against the no-DP run of the same task and seed (None when it was not audited)."""
    plain = {(row["task"], row["seed"]): row["utility"] for row in rows if row["target_epsilon"] is None}
    for row in rows:
        reference = plain.get((row["task"], row["seed"]))
        row["utility_lost_points"] = None if reference is None else {
            view: {metric: 100.0 * (reference[view][metric] - row["utility"][view][metric]) for metric in UTILITY_METRICS}
            for view in UTILITY_VIEWS
        }  # fmt: skip


def aim_verdict(rows: list[dict]) -> dict:
    """The issue's aim at every DP setting with target ε <= 3: every attack's AUC <= 0.55 and at most
    2 accuracy points lost (the larger loss of the two test views)."""
    checked = [row for row in rows if row["target_epsilon"] is not None and row["target_epsilon"] <= AIM["max_epsilon"]]
    failures = []
    for row in checked:
        worst_auc = max(attack["auc"] for attack in row["attacks"].values())
        lost = row["utility_lost_points"]
        worst_lost = None if lost is None else max(lost[view]["accuracy"] for view in UTILITY_VIEWS)
        if worst_auc > AIM["max_attack_auc"] or worst_lost is None or worst_lost > AIM["max_accuracy_lost_points"]:
            failures.append({"task": row["task"], "seed": row["seed"], "target_epsilon": row["target_epsilon"],
                             "attack_auc": worst_auc, "accuracy_lost_points": worst_lost})  # fmt: skip
    return AIM | {"settings_checked": len(checked), "met": bool(checked) and not failures, "failures": failures}


def markdown_table(rows: list[dict]) -> str:
    def interval(attack: dict) -> str:
        return f"{attack['auc']:.3f} [{attack['ci_low']:.3f}, {attack['ci_high']:.3f}]"

    def number(value: float | None, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    lines = [
        "| task | seed | target ε | ε spent (max site) | pooled-test accuracy | pooled-test AUROC | sites' test accuracy "
        "| accuracy lost (pts, pooled / sites) | loss-threshold AUC [95% CI] | offline LiRA AUC [95% CI] | members / non-members |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        attacks, lost, utility = row["attacks"], row["utility_lost_points"], row["utility"]
        cells = [
            row["task"], str(row["seed"]), "no DP" if row["target_epsilon"] is None else format(row["target_epsilon"], "g"),
            number(row["epsilon_spent_max_site"], ".2f"), number(utility["pooled_test"]["accuracy"], ".3f"),
            number(utility["pooled_test"]["auroc"], ".3f"), number(utility["sites_test"]["accuracy"], ".3f"),
            "—" if lost is None else f"{lost['pooled_test']['accuracy']:+.1f} / {lost['sites_test']['accuracy']:+.1f}",
            interval(attacks["loss_threshold"]), interval(attacks["lira_offline"]),
            f"{attacks['loss_threshold']['members']} / {attacks['loss_threshold']['non_members']}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["fed_heart_disease", "breast_cancer"])
    parser.add_argument("--epsilons", type=float, nargs="*", default=[8.0, 3.0, 1.0], help="DP settings besides no DP")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--reference-models", type=int, default=8, help="LiRA reference federations (even)")
    parser.add_argument("--rounds", type=int, default=None, help="federation.num_rounds (default: the config's)")
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    parser.add_argument("--run-dir", type=Path, nargs="*", default=[], help="audit these finished runs, simulate nothing")
    parser.add_argument("--keep-runs", type=Path, default=None, help="keep the simulated runs here (default: a temp folder)")
    parser.add_argument("--audit-seed", type=int, default=0, help="member draw, reference halves, bootstrap")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    from .bench_fed_heart_disease import git_commit  # imports Flower and Ray: the audit's entry point only
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    overrides = [*args.override, *([f"federation.num_rounds={args.rounds}"] if args.rounds else [])]

    def audit(path: Path) -> dict:
        row = audit_run(path, reference_models=args.reference_models, seed=args.audit_seed)
        attacks = row["attacks"]
        print(f"{row['task']} ε={row['target_epsilon']} seed {row['seed']}: pooled-test accuracy {row['utility']['pooled_test']['accuracy']:.3f}, "
              f"loss-attack AUC {attacks['loss_threshold']['auc']:.3f}, LiRA AUC {attacks['lira_offline']['auc']:.3f}", flush=True)  # fmt: skip
        return row

    if args.run_dir:
        rows = [audit(path) for path in args.run_dir]
    else:
        with tempfile.TemporaryDirectory(prefix="medtwin-mia-") as scratch:
            runs_root = args.keep_runs or Path(scratch)
            settings = [(task, epsilon, seed) for task in args.tasks for epsilon in [None, *args.epsilons] for seed in args.seeds]
            rows = [audit(simulate_setting(*setting, runs_root=runs_root, overrides=overrides)) for setting in settings]
    add_utility_lost(rows)
    command = " ".join(["python -m medtwin.experiments.mia_audit", *(sys.argv[1:] if argv is None else argv)])
    report = {"commit": git_commit(), "command": command,
              "aim": aim_verdict(rows), "rows": rows}  # fmt: skip
    atomic_write_text(args.out, json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    print(f"\nMembership inference against the final federated model, commit {report['commit']}\n")
    print(markdown_table(rows))
    print(f"\naim (attack AUC <= 0.55 with <= 2 accuracy points lost at ε <= 3): {'met' if report['aim']['met'] else 'NOT met'}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
