"""Server optimisers applied at the sites: Flower's math, CKKS = plain within the HE bound, and state a
coordinator cannot bend (client/server_optimizer.py, client/global_state.py)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

from medtwin.client.codec import CkksSiteCodec, PlainSiteCodec
from medtwin.client.global_state import (
    GlobalState,
    GlobalStateStore,
    SharedStateRefused,
    advance_global_state,
    initial_global_state,
)
from medtwin.client.proposal import ProposalRefused, parse_proposal
from medtwin.client.server_optimizer import OptimizerMoments, ServerOptimizerSettings, server_step
from medtwin.client.site_file import site_file_from_mapping
from medtwin.core.config import compose_config, config_to_yaml
from medtwin.core.errors import ConfigError
from medtwin.core.he import choose_ckks_parameters, create_secret_context

SHAPES = {"layer.weight": (6, 5), "layer.bias": (5,)}  # two arrays, flattened in this order
SIZE = sum(int(np.prod(shape)) for shape in SHAPES.values())
COUNTS = (120, 300, 45)

SETTINGS = {
    "none": ServerOptimizerSettings(name="none"),
    "adam": ServerOptimizerSettings(name="adam", learning_rate=0.1),
    "yogi": ServerOptimizerSettings(name="yogi", learning_rate=0.01),
    "avgm": ServerOptimizerSettings(name="avgm", learning_rate=1.0, momentum=0.9),
}


def _site_weights(rng: np.random.Generator, around: np.ndarray) -> list[np.ndarray]:
    """What three sites send after "training" from `around`: a shared drift plus each site's own."""
    drift = rng.normal(0.0, 0.05, around.size)
    sent = [np.clip(around + drift + rng.normal(0.0, 0.02, around.size), -1.5, 1.5) for _ in COUNTS]
    return [weights.astype(np.float32).astype(np.float64) for weights in sent]  # a model's float32 weights


def _weighted_average(weights: list[np.ndarray]) -> np.ndarray:
    return sum(count * w for count, w in zip(COUNTS, weights, strict=True)) / sum(COUNTS)


def _as_arrays(vector: np.ndarray) -> dict[str, np.ndarray]:
    arrays, offset = {}, 0
    for name, shape in SHAPES.items():
        size = int(np.prod(shape))
        arrays[name] = vector[offset : offset + size].reshape(shape)
        offset += size
    return arrays


def _reply(vector: np.ndarray, count: int) -> Message:
    metadata = Metadata(
        run_id=1, message_id=f"m-{time.monotonic_ns()}", src_node_id=1, dst_node_id=0, reply_to_message_id="x",
        group_id="", created_at=time.time(), ttl=600.0, message_type="train",
    )  # fmt: skip
    arrays = ArrayRecord({name: Array(array) for name, array in _as_arrays(vector).items()})
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": count})}), metadata=metadata)


@pytest.mark.parametrize(
    ("name", "strategy"),
    [
        ("adam", FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)),
        ("yogi", FedYogi(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3)),
        ("avgm", FedAvgM(server_learning_rate=1.0, server_momentum=0.9)),
        ("avgm", FedAvgM(server_learning_rate=0.5, server_momentum=0.0)),
    ],
)
def test_the_step_is_flowers_strategy_round_after_round(name: str, strategy) -> None:  # noqa: ANN001
    """Four rounds of Flower's own FedAdam / FedYogi / FedAvgM against `server_step` on the same replies."""
    settings = replace(SETTINGS[name], learning_rate=getattr(strategy, "eta", getattr(strategy, "server_learning_rate", 1.0)))
    if name == "avgm":
        settings = replace(settings, momentum=strategy.server_momentum)
    rng = np.random.default_rng(3)
    ours = rng.normal(0.0, 0.3, SIZE)
    moments = OptimizerMoments.zeros(SIZE)
    flower_arrays = ArrayRecord({key: Array(value.copy()) for key, value in _as_arrays(ours).items()})
    for server_round in range(1, 5):
        sent = _site_weights(rng, ours)
        # what Flower's configure_train records before a round (FedAvgM keeps its own after round 1)
        if name == "avgm":
            strategy.current_arrays = strategy.current_arrays or flower_arrays
        else:
            strategy.current_arrays = {key: array.numpy() for key, array in flower_arrays.items()}
        flower_arrays, _ = strategy.aggregate_train(server_round, [_reply(w, n) for w, n in zip(sent, COUNTS, strict=True)])
        ours, moments = server_step(settings, weights=ours, moments=moments, average=_weighted_average(sent), server_round=server_round)
        flower_vector = np.concatenate([flower_arrays[key].numpy().ravel() for key in SHAPES])
        np.testing.assert_allclose(ours, flower_vector, rtol=1e-10, atol=1e-12)
    assert np.abs(moments.first).max() > 0  # the moments carried from round to round


def test_fedavg_is_the_average_and_fedavgm_without_momentum_at_rate_one_too() -> None:
    rng = np.random.default_rng(5)
    previous, average = rng.normal(size=SIZE), rng.normal(size=SIZE)
    for settings in (SETTINGS["none"], ServerOptimizerSettings(name="avgm", learning_rate=1.0, momentum=0.0)):
        weights, _ = server_step(settings, weights=previous, moments=OptimizerMoments.zeros(SIZE), average=average, server_round=2)
        np.testing.assert_allclose(weights, average, rtol=0, atol=1e-15)


def _step_error_bound(
    settings: ServerOptimizerSettings, plain_before: GlobalState, plain_after: GlobalState, average: np.ndarray,
    errors: tuple[np.ndarray, np.ndarray, np.ndarray], average_error: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Elementwise bounds on |model|, |m|, |v| errors after one step, given the inputs' error bounds
    (the previous state's and the average's), from the step's equations (Reddi et al. 2021; Yogi's sign
    may flip near v = delta**2, where v can jump by (1 - beta_2) * 2 delta**2)."""
    model_error, first_error, second_error = errors
    if settings.name == "none":
        return np.full(SIZE, average_error), first_error, second_error
    delta_error = average_error + model_error
    if settings.name == "avgm":
        first_error = settings.momentum * first_error + delta_error
        return model_error + settings.learning_rate * first_error, first_error, second_error
    delta = average - plain_before.weights
    square_error = 2 * np.abs(delta) * delta_error + delta_error**2
    first_error = settings.beta_1 * first_error + (1 - settings.beta_1) * delta_error
    if settings.name == "adam":
        second_error = settings.beta_2 * second_error + (1 - settings.beta_2) * square_error
        step = settings.learning_rate * np.sqrt(1 - settings.beta_2 ** (plain_after.server_round + 1)) / (
            1 - settings.beta_1 ** (plain_after.server_round + 1)
        )
    else:
        may_flip = np.abs(plain_before.moments.second - delta**2) <= second_error + square_error
        second_error = second_error + (1 - settings.beta_2) * np.where(may_flip, 2 * delta**2 + square_error, square_error)
        step = settings.learning_rate
    second = plain_after.moments.second
    root = np.sqrt(second)
    root_error = np.minimum(np.sqrt(second_error), np.divide(second_error, root, out=np.full(SIZE, np.inf), where=root > 0))
    denominator = root + settings.tau
    perturbed_floor = np.maximum(settings.tau, denominator - root_error)
    update_error = first_error / perturbed_floor + np.abs(plain_after.moments.first) * root_error / (denominator * perturbed_floor)
    return model_error + step * update_error, first_error, second_error


@pytest.fixture(scope="module")
def ckks_context():
    parameters = choose_ckks_parameters(
        num_parameters=SIZE, num_sites=len(COUNTS), max_relative_error=1e-5, max_abs_weight_bound=2.0,
        max_total_examples=1000, poly_modulus_degree=4096,
    )  # fmt: skip
    return create_secret_context(parameters)


@pytest.mark.parametrize("name", ["none", "adam", "yogi", "avgm"])
def test_under_ckks_the_site_derives_the_plain_model_within_the_he_bound(name: str, ckks_context, tmp_path: Path) -> None:
    """Three rounds at two sites that see the same updates, one through real TenSEAL ciphertexts and the
    project's codec, one in plain floats: each sums, averages and applies the step from its own stored
    state. The CKKS site's model, moments and all, stays within the error the codec's bound allows."""
    settings = SETTINGS[name]
    ckks, plain = CkksSiteCodec(ckks_context, kit_dir=tmp_path / "kit"), PlainSiteCodec()
    start = initial_global_state(run_id="run-he", settings=settings, weights=np.random.default_rng(1).normal(0, 0.3, SIZE))
    stores = {"plain": GlobalStateStore(tmp_path / "plain", "run-he"), "ckks": GlobalStateStore(tmp_path / "ckks", "run-he")}
    states = {"plain": start, "ckks": start}
    errors = (np.zeros(SIZE), np.zeros(SIZE), np.zeros(SIZE))
    rng = np.random.default_rng(11)
    for server_round in (1, 2, 3):
        sent = _site_weights(rng, states["plain"].weights)
        averages = {}
        for side, codec in (("plain", plain), ("ckks", ckks)):
            updates = [codec.pack(w, num_examples=n, run_id="run-he") for w, n in zip(sent, COUNTS, strict=True)]
            averages[side], total = codec.average(codec.sum(updates))
            assert total == pytest.approx(sum(COUNTS), abs=0.5 + codec.count_error_bound())
        average_error = ckks.error_bound(total_examples=sum(COUNTS))
        assert 0 < np.abs(averages["ckks"] - averages["plain"]).max() <= average_error  # real ciphertexts, real error
        before = dict(states)
        for side in states:
            states[side] = advance_global_state(
                stores[side], initial=start, server_round=server_round, average=averages[side],
                inputs_sha256=f"round-{server_round}", started_from=(states[side].sha256,) * len(COUNTS),
            )  # fmt: skip
        errors = _step_error_bound(settings, before["plain"], states["plain"], averages["plain"], errors, average_error)
        slack = 1e-12
        assert np.all(np.abs(states["ckks"].weights - states["plain"].weights) <= errors[0] + slack)
        if settings.stateful:
            assert np.all(np.abs(states["ckks"].moments.first - states["plain"].moments.first) <= errors[1] + slack)
        if settings.stateful and server_round >= 2:  # the bound is tight enough to catch a site that lost its moments
            forgetful, _ = server_step(
                settings, weights=before["ckks"].weights, moments=OptimizerMoments.zeros(SIZE), average=averages["ckks"],
                server_round=server_round,
            )  # fmt: skip
            assert np.any(np.abs(forgetful - states["plain"].weights) > errors[0] + slack)


def _stateful_setup(tmp_path: Path, name: str = "adam") -> tuple[GlobalStateStore, GlobalState]:
    start = initial_global_state(run_id="run-1", settings=SETTINGS[name], weights=np.linspace(-1, 1, SIZE))
    return GlobalStateStore(tmp_path, "run-1"), start


def _advance(store: GlobalStateStore, start: GlobalState, server_round: int, *, inputs: str, started_from: str, seed: int = 0) -> GlobalState:
    average = np.random.default_rng(seed + server_round).normal(0, 0.3, SIZE)
    return advance_global_state(
        store, initial=start, server_round=server_round, average=average, inputs_sha256=inputs, started_from=(started_from,) * 3
    )


def test_a_coordinator_cannot_mix_updates_trained_from_another_state(tmp_path: Path) -> None:
    store, start = _stateful_setup(tmp_path)
    with pytest.raises(SharedStateRefused) as caught:
        advance_global_state(
            store, initial=start, server_round=1, average=np.zeros(SIZE), inputs_sha256="a",
            started_from=(start.sha256, start.sha256, "ff" * 32),
        )  # fmt: skip
    assert caught.value.code == "state_mismatch" and "1 of the 3" in caught.value.reason
    assert store.rounds() == []  # nothing applied
    first = _advance(store, start, 1, inputs="a", started_from=start.sha256)
    with pytest.raises(SharedStateRefused) as caught:  # round 2's updates must come from round 1's state
        _advance(store, start, 2, inputs="b", started_from=start.sha256)
    assert caught.value.code == "state_mismatch"
    assert _advance(store, start, 2, inputs="b", started_from=first.sha256).previous_sha256 == first.sha256


def test_a_round_is_stepped_once_and_rounds_come_in_order(tmp_path: Path) -> None:
    store, start = _stateful_setup(tmp_path)
    first = _advance(store, start, 1, inputs="a", started_from=start.sha256)
    again = _advance(store, start, 1, inputs="a", started_from=start.sha256)  # a resumed coordinator asks again
    assert again.sha256 == first.sha256 and np.array_equal(again.moments.second, first.moments.second)
    with pytest.raises(SharedStateRefused) as caught:  # the same round, other certified updates
        _advance(store, start, 1, inputs="other", started_from=start.sha256, seed=9)
    assert caught.value.code == "state_conflict"
    second = _advance(store, start, 2, inputs="b", started_from=first.sha256)
    _advance(store, start, 3, inputs="c", started_from=second.sha256)
    assert store.rounds() == [2, 3]  # the newest two are kept
    with pytest.raises(SharedStateRefused) as caught:  # round 1 replayed after round 3
        _advance(store, start, 1, inputs="a2", started_from=start.sha256)
    assert caught.value.code == "out_of_order"


def test_a_site_that_missed_a_round_sits_out_but_fedavg_rejoins(tmp_path: Path) -> None:
    store, start = _stateful_setup(tmp_path)
    _advance(store, start, 1, inputs="a", started_from=start.sha256)
    with pytest.raises(SharedStateRefused) as caught:  # round 2 never reached this site
        _advance(store, start, 3, inputs="c", started_from="ab" * 32)
    assert caught.value.code == "missing_state" and "round 2" in caught.value.reason
    fedavg_store, fedavg_start = _stateful_setup(tmp_path / "fedavg", "none")
    rejoined = _advance(fedavg_store, fedavg_start, 5, inputs="e", started_from="anything")
    np.testing.assert_array_equal(rejoined.weights, np.random.default_rng(5).normal(0, 0.3, SIZE))
    assert fedavg_store.rounds() == []  # FedAvg keeps nothing


def test_a_damaged_or_edited_state_file_is_refused_not_trained_from(tmp_path: Path) -> None:
    store, start = _stateful_setup(tmp_path)
    first = _advance(store, start, 1, inputs="a", started_from=start.sha256)
    assert store.path(1).stat().st_mode & 0o777 == 0o600
    edited = GlobalState(
        run_id="run-1", server_round=1, settings=start.settings, weights=first.weights + 1e-3, moments=first.moments,
        inputs_sha256="a", previous_sha256=start.sha256,
    )  # fmt: skip
    meta = {"inputs_sha256": "a", "previous_sha256": start.sha256, "sha256": first.sha256}  # the old digest kept
    with store.path(1).open("wb") as handle:  # someone rewrites the model in a well-formed file
        np.savez(
            handle, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), weights=edited.weights,
            first=edited.moments.first, second=edited.moments.second,
        )  # fmt: skip
    with pytest.raises(SharedStateRefused) as caught:
        _advance(store, start, 2, inputs="b", started_from=first.sha256)
    assert caught.value.code == "state_damaged"
    for damaged in (b"not a state", b""):  # garbage, or a file emptied by a damaged disk or a bad restore
        store.path(1).write_bytes(damaged)
        with pytest.raises(SharedStateRefused) as caught:
            _advance(store, start, 2, inputs="b", started_from=first.sha256)
        assert caught.value.code == "state_damaged"


def test_the_state_digest_binds_run_round_settings_and_moments() -> None:
    weights = np.linspace(-1, 1, SIZE)
    base = initial_global_state(run_id="run-1", settings=SETTINGS["adam"], weights=weights)
    others = [
        initial_global_state(run_id="run-2", settings=SETTINGS["adam"], weights=weights),
        initial_global_state(run_id="run-1", settings=replace(SETTINGS["adam"], tau=1e-2), weights=weights),
        replace(base, server_round=1),
        replace(base, moments=OptimizerMoments(np.full(SIZE, 1e-9), base.moments.second)),
    ]
    assert len({base.sha256, *(other.sha256 for other in others)}) == 5


# --- config and proposal -----------------------------------------------------------------------


def test_unknown_or_out_of_range_settings_fail_at_config_load_naming_the_key() -> None:
    for override, key in (
        ("strategy.server_optimizer=adagrad", "strategy.server_optimizer"),
        ("strategy.beta_2=1.0", "strategy.beta_2"),
        ("strategy.tau=0", "strategy.tau"),
        ("strategy.server_momentum=-0.1", "strategy.server_momentum"),
    ):
        with pytest.raises(ConfigError) as caught:
            compose_config([override])
        assert caught.value.key == key, override
    for recipe, expected in (("fedadam", "adam"), ("fedyogi", "yogi"), ("fedavgm", "avgm")):
        assert compose_config([f"strategy={recipe}"]).strategy.server_optimizer == expected


SITE = {
    "site_id": "cleveland",
    "data": {"builtin": {"task": "fed_heart_disease", "index": 0}},
    "privacy": {"max_epsilon": 3.0, "max_delta": 1e-4},
    "kit_dir": "kit",
    "state_dir": "state",
}


def test_a_site_takes_the_proposals_server_optimiser_only_within_its_file(tmp_path: Path) -> None:
    def proposal(*overrides: str) -> str:
        return config_to_yaml(compose_config(["privacy=dp", "privacy.target_epsilon=3", "strategy.batch_size=8", "run_id=run-1", *overrides]))

    default_site = site_file_from_mapping(SITE, path=tmp_path / "site.yaml")
    accepted = parse_proposal(proposal("strategy=fedyogi", "strategy.batch_size=8"), default_site).config.strategy
    assert (accepted.server_optimizer, accepted.server_learning_rate, accepted.beta_2) == ("yogi", 0.01, 0.99)
    strict = site_file_from_mapping(
        {**SITE, "accept": {"server_optimizers": ["none", "avgm"], "max_server_learning_rate": 0.05}}, path=tmp_path / "site.yaml"
    )
    cases = (
        (proposal("strategy=fedadam", "strategy.batch_size=8"), "not_accepted", "accept.server_optimizers"),
        (proposal("strategy=fedavgm", "strategy.batch_size=8"), "over_limit", "accept.max_server_learning_rate 0.05"),
        (proposal().replace("server_optimizer: none", "server_optimizer: adagrad"), "bad_proposal", "strategy.server_optimizer"),
        (proposal().replace("tau: 0.001", "tau: -1.0"), "bad_proposal", "strategy.tau"),
    )
    for text, code, named in cases:
        with pytest.raises(ProposalRefused) as caught:
            parse_proposal(text, strict)
        assert caught.value.code == code and named in caught.value.reason, (code, caught.value.reason)
    with pytest.raises(Exception, match="accept.server_optimizers"):
        site_file_from_mapping({**SITE, "accept": {"server_optimizers": ["adagrad"]}}, path=tmp_path / "site.yaml")


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm", "fedavg"])
def test_the_harness_scores_the_model_the_sites_stepped_to_not_the_last_average(strategy: str, tmp_path: Path) -> None:
    """The baselines' "federated" row, the pooled test figure (the sweep objective), the twin page and the
    membership audit take the final model from `final_weights`: under a server optimiser that is every
    round's step replayed from the initial model, as each site applied it, not the last round's average."""
    from medtwin.client.app import initial_model
    from medtwin.core.artifacts import ArtifactStore
    from medtwin.core.model_vector import model_to_vector
    from medtwin.core.plain_payload import average_from_sum, pack_plain_update, sum_plain_updates
    from medtwin.core.protocol import record_bytes
    from medtwin.core.rundir import RunDirectory
    from medtwin.core.tasks import get_task
    from medtwin.experiments.federation_setup import SimulatedFederation
    from medtwin.experiments.simulate import final_weights

    overrides = [f"strategy={strategy}"] + (["strategy.server_momentum=0.9"] if strategy == "fedavgm" else [])
    config = compose_config(overrides)
    run_dir = RunDirectory(tmp_path / "runs", "run-final")
    store = ArtifactStore(run_dir.artifacts)
    settings = ServerOptimizerSettings.from_strategy(config.strategy)
    weights = model_to_vector(initial_model(get_task(config.task), seed=config.seed))
    moments = OptimizerMoments.zeros(weights.size)
    rng = np.random.default_rng(5)
    for server_round in (1, 2, 3):
        sent = _site_weights(rng, weights)
        summed = sum_plain_updates([pack_plain_update(w, num_examples=n) for w, n in zip(sent, COUNTS, strict=True)])
        digest = store.put(record_bytes(summed), kind="aggregate")
        run_dir.append_metrics({"round": server_round, "phase": "train", "aggregate_sha256": digest})
        average = average_from_sum(summed)[0]
        weights, moments = server_step(settings, weights=weights, moments=moments, average=average, server_round=server_round)
    federation = SimulatedFederation(root=tmp_path, kit_dirs={site: tmp_path / site for site in get_task(config.task).site_ids()})

    final = final_weights(config, run_dir, federation, digest)
    np.testing.assert_array_equal(final, weights)  # bit for bit the sites' model
    if strategy != "fedavg":
        assert not np.allclose(final, average)  # ... which is not the last round's average
        with pytest.raises(RuntimeError, match="do not lead to the final aggregate"):  # not a history it cannot replay
            final_weights(config, run_dir, federation, "0" * 64)
