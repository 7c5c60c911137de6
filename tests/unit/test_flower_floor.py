"""The Flower floor bench (experiments/flower_floor.py, bench_flower_floor.py): its messages have medtwin's
shapes, and its summary reads rounds and phases as documented."""

from __future__ import annotations

import pytest

from medtwin.core.protocol import INSTRUCTION
from medtwin.experiments.bench_flower_floor import summarize_floor
from medtwin.experiments.deployment import DeploymentError
from medtwin.experiments.flower_floor import INSTRUCTION_SHAPE, PHASES, REPLY_SHAPES, instruction_content, reply_content, shape_of


@pytest.mark.parametrize("phase", PHASES)
def test_an_instruction_has_the_objects_and_bytes_of_medtwins(phase: str) -> None:
    content = instruction_content(3, phase)
    assert list(content) == [INSTRUCTION, *INSTRUCTION_SHAPE]
    for name, shape in INSTRUCTION_SHAPE.items():
        objects, size = shape_of(content[name])
        assert objects == (3 if shape.kind == "arrays" else 1)
        assert abs(size - shape.deflated_bytes) <= 8, name
    assert shape_of(content)[0] == 6  # + the Message itself: 7, as medtwin's train and evaluate instructions


@pytest.mark.parametrize("phase", PHASES)
def test_a_reply_has_the_objects_and_bytes_of_medtwins(phase: str) -> None:
    content = reply_content(phase, "node/round")
    for name, shape in REPLY_SHAPES[phase].items():
        objects, size = shape_of(content[name])
        assert objects == (3 if shape.kind == "arrays" else 1)
        assert abs(size - shape.deflated_bytes) <= 8, name
    assert content[next(iter(REPLY_SHAPES[phase]))].object_id != reply_content(phase, "other node/round")[next(iter(REPLY_SHAPES[phase]))].object_id


def test_a_phase_shares_the_latest_aggregates_objects_as_medtwin_does() -> None:
    """Round r's evaluate and round r+1's train carry round r's aggregate; a new round brings new objects."""
    evaluate_2, train_3, evaluate_3 = instruction_content(2, "evaluate"), instruction_content(3, "train"), instruction_content(3, "evaluate")
    for name in INSTRUCTION_SHAPE:
        assert evaluate_2[name].object_id == train_3[name].object_id
        assert train_3[name].object_id != evaluate_3[name].object_id
    assert evaluate_2[INSTRUCTION]["round"] == 2 and train_3[INSTRUCTION]["phase"] == "train"


def _phase(server_round: int, phase: str, started: float, *, replies: int = 2, errors: list | None = None) -> dict:
    return {
        "round": server_round, "phase": phase, "started": started, "pushed": started + 0.1, "ended": started + 1.0,
        "replied": {str(node): started + 0.9 - 0.1 * node for node in range(replies)}, "errors": errors or [],
    }  # fmt: skip


def test_the_summary_is_rounds_of_two_phases_and_milestones_of_the_latest_site() -> None:
    phases = [_phase(1, "train", 0.0), _phase(1, "evaluate", 10.0), _phase(2, "train", 20.0), _phase(2, "evaluate", 30.0)]
    phases[0]["ended"] = 5.0  # round 1: start-up
    tasks = {
        site: [{"started": start + 0.2 + lag, "pulled": start + 0.5 + lag, "pushed": start + 0.6 + lag, "ended": start + 0.7 + lag} for start in (0.0, 10.0, 20.0, 30.0)]
        for site, lag in (("a", 0.0), ("b", 0.1))
    }
    summary = summarize_floor({"phases": phases}, tasks, sites=2)
    assert summary["round_s"] == pytest.approx([6.0, 2.0])
    assert summary["round_s_median_later"] == pytest.approx(2.0)
    milestones = summary["phase_milestones_s_median_later"]  # rounds 2..N only, the later of the two sites
    assert milestones["task_started"] == pytest.approx(0.3) and milestones["reply_pushed"] == pytest.approx(0.7)
    assert milestones["replied"] == pytest.approx(0.9) and milestones["pushed"] == pytest.approx(0.1)


def test_a_phase_with_a_missing_or_failed_reply_is_no_measurement() -> None:
    with pytest.raises(DeploymentError, match="round 1 train: 1 of 2 replies"):
        summarize_floor({"phases": [_phase(1, "train", 0.0, replies=1)]}, {}, sites=2)
    with pytest.raises(DeploymentError, match="boom"):
        summarize_floor({"phases": [_phase(1, "train", 0.0, errors=["boom"])]}, {}, sites=2)


def test_only_the_floors_supernodes_run_the_no_op_worker(tmp_path) -> None:
    """A site's SuperNode stays wrapped by warm_clientapp (its worker pinned to medtwin's ClientApp)."""
    from medtwin.experiments.bench_flower_floor import FloorSiteProcess
    from medtwin.experiments.deployment import SiteProcess

    assert SiteProcess(tmp_path / "site.yaml", "127.0.0.1:1", port=5).executor_command()[1:3] == ["-m", "medtwin.experiments.warm_clientapp"]
    floor = FloorSiteProcess(tmp_path / "site.yaml", "127.0.0.1:1", port=5)
    floor.state_dir = tmp_path
    assert floor.executor_command()[1:3] == ["-m", "medtwin.experiments.flower_floor"]
