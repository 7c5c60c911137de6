"""task.normalization=federated: global feature statistics from per-site sums, through the run's codec.

The global mean and variance a site derives must be numpy's on the union of the sites' TRAINING rows
(plain, and real CKKS ciphertexts within the codec's error bound); a coordinator cannot make a site
normalise with statistics that are not certified or not plausible; configs that cannot run are refused.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Context, Message, Metadata, RecordDict

from medtwin.client.app import build_client_app
from medtwin.client.codec import CkksSiteCodec, PlainSiteCodec
from medtwin.client.normalization import PLAIN_TOLERANCE, normalised_site
from medtwin.client.site import load_site
from medtwin.client.site_state import SiteApprovals
from medtwin.core.config import compose_config, config_to_yaml
from medtwin.core.config.normalization import check_normalization
from medtwin.core.errors import ConfigError
from medtwin.core.hashing import code_hash, config_hash
from medtwin.core.he import choose_ckks_parameters, create_secret_context
from medtwin.core.identity import ReplyClaim, init_site_identity, join_federation, load_site_kit, provision_federation, sign_claim
from medtwin.core.protocol import (
    INSTRUCTION,
    SITE,
    STATISTICS_AGGREGATE,
    STATISTICS_CERTIFICATE,
    STATISTICS_CERTIFIED_PREFIX,
    STATISTICS_INPUTS,
    UPDATE,
    RoundCertificate,
    certified_record_name,
    pack_payloads,
    claim_from_site_record,
    instruction,
    payload_sha256,
)
from medtwin.core.runconfig import CONFIG_YAML_KEY
from medtwin.core.tasks import get_task
from medtwin.core.tasks.federated_statistics import (
    ImplausibleStatisticsError,
    standardiser_from_average,
    statistics_vector,
)
from medtwin.core.tasks.preprocessing import STD_EPSILON

SITES = ("site0", "site1", "site2")


@pytest.fixture(scope="module")
def task():
    return get_task(compose_config(["task=breast_cancer", "task.num_sites=3", "task.normalization=federated"]).task)


@pytest.fixture(scope="module")
def raw_splits(task):
    splits = [task.load_site_unnormalised(index) for index in range(3)]
    with_gaps = splits[1].x_train.copy()
    with_gaps[::7, 3] = np.nan  # missing cells count in no sum
    with_gaps[::5, 10] = np.nan
    return [splits[0], replace(splits[1], x_train=with_gaps), splits[2]]


def _union(raw_splits) -> np.ndarray:
    return np.concatenate([split.x_train for split in raw_splits])


def _packed(codec, task, raw_splits, length: int) -> list:
    reference = task.feature_reference()
    return [
        codec.pack(statistics_vector(split.x_train, reference, length=length), num_examples=split.num_train, run_id="r")
        for split in raw_splits
    ]


def test_plain_sums_give_numpys_mean_and_variance_of_the_union_of_training_rows(task, raw_splits) -> None:
    codec = PlainSiteCodec()
    length = 513  # the breast-cancer MLP's parameter count
    average, total = codec.average(codec.sum(_packed(codec, task, raw_splits, length)))
    reference = task.feature_reference()
    standardiser = standardiser_from_average(average, total_rows=total, reference=reference, tolerance=PLAIN_TOLERANCE)
    union = _union(raw_splits)
    assert total == union.shape[0]
    scale = reference.half_range
    np.testing.assert_allclose(standardiser.mean, np.nanmean(union, axis=0), rtol=0, atol=float(np.max(scale)) * 1e-6)
    np.testing.assert_allclose(standardiser.std, np.nanstd(union, axis=0, ddof=1), rtol=1e-5)
    # not any site's own statistics: the test would fail if a site normalised with its own rows
    assert not np.allclose(standardiser.mean, np.nanmean(raw_splits[0].x_train, axis=0), rtol=1e-3)


def test_real_ckks_sums_give_numpys_statistics_within_the_codecs_error_bound(task, tmp_path: Path) -> None:
    complete = [task.load_site_unnormalised(index) for index in range(3)]  # no missing cells: the plain test has them
    length = 513
    parameters = choose_ckks_parameters(
        num_parameters=length, num_sites=3, max_relative_error=1e-5, max_abs_weight_bound=1.0, max_total_examples=1000
    )
    codec = CkksSiteCodec(create_secret_context(parameters), kit_dir=tmp_path)
    average, total = codec.average(codec.sum(_packed(codec, task, complete, length)))
    tolerance = codec.error_bound(total_examples=total)
    assert 0 < tolerance < 1e-3  # the bound is tight enough for the comparison below to mean something
    reference = task.feature_reference()
    standardiser = standardiser_from_average(average, total_rows=total, reference=reference, tolerance=tolerance)
    union = _union(complete)
    rows = union.shape[0]
    assert total == rows
    # every decoded share/moment is within `tolerance`: the mean of u within 2 tol, its variance within 4 tol
    scale = reference.half_range
    assert np.all(np.abs(standardiser.mean - union.mean(axis=0)) <= scale * 2.05 * tolerance)
    variance_bound = scale**2 * 4.1 * tolerance * rows / (rows - 1)
    assert np.all(np.abs(standardiser.std**2 - union.var(axis=0, ddof=1)) <= variance_bound)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v, f: v.__setitem__(slice(2 * f, 3 * f), 0.0), "variance is negative"),  # E[u^2] = 0 < E[u]^2
        (lambda v, f: v.__setitem__(0, 1.5), "share of observed values"),
        (lambda v, f: v.__setitem__(f, 1.2), "moment is beyond"),
        (lambda v, f: v.__setitem__(-1, 0.01), "padding"),
        (lambda v, f: v.__setitem__(slice(0, f), 1.0 / 400), "fewer than two observed"),
    ],
)
def test_statistics_no_honest_sum_gives_are_refused(task, raw_splits, change, message: str) -> None:
    reference = task.feature_reference()
    vector = statistics_vector(raw_splits[0].x_train, reference, length=200)
    change(vector, reference.num_features)
    with pytest.raises(ImplausibleStatisticsError, match=message):
        standardiser_from_average(vector, total_rows=200, reference=reference, tolerance=1e-6)


def test_rows_outside_the_public_reference_range_are_not_encoded(task, raw_splits) -> None:
    rows = raw_splits[0].x_train.copy()
    rows[0, 2] = task.feature_reference().centre[2] + 3 * task.feature_reference().half_range[2]
    with pytest.raises(ImplausibleStatisticsError, match="outside the task's reference range"):
        statistics_vector(rows, task.feature_reference(), length=200)


# --- a hostile coordinator against the ClientApp -----------------------------------------------------


class Federation:
    def __init__(self, root: Path) -> None:
        self.kits = {site: root / site / "kit" for site in SITES}
        public = [init_site_identity(self.kits[site], site_id=site) for site in SITES]
        admin = provision_federation(root / "admin", federation_name="fednorm-test", site_public_files=public)
        for site in SITES:
            join_federation(self.kits[site], admin.manifest_path)
        self.state_dir = root / "site0" / "state"
        self.site_file = root / "site0" / "site.yaml"
        self.site_file.write_text(
            yaml.safe_dump(
                {
                    "site_id": "site0",
                    "research_simulation": True,
                    "data": {"builtin": {"task": "breast_cancer", "index": 0}},
                    "accept": {"tasks": ["breast_cancer"], "max_rounds": 20, "max_local_steps": 100},
                    "privacy": {"require_dp": False, "max_epsilon": 3.0, "max_delta": 1e-4, "max_total_epsilon": 10.0},
                    "evaluation": {"release": "exact", "min_participants": 2},
                    "approvals": "local",
                    "kit_dir": str(self.kits["site0"]),
                    "state_dir": str(self.state_dir),
                }
            )
        )

    def proposal(self, *overrides: str) -> tuple[str, str]:
        config = compose_config(
            ["task=breast_cancer", "task.num_sites=3", "task.normalization=federated", "privacy=none",
             "federation.num_rounds=2", "federation.min_sites=2", "strategy.local_steps=2", *overrides]
        )  # fmt: skip
        config = replace(config, run_id=f"run-{time.monotonic_ns()}")
        text = config_to_yaml(config)
        SiteApprovals(self.state_dir).approve(run_id=config.run_id, config_hash=config_hash(text), code_hash=code_hash())
        return config.run_id, text

    def ask(self, text: str, *, run_id: str, message_type: str, server_round: int, extra: dict | None = None) -> Message:
        return build_client_app()(self.message(run_id, message_type, server_round, extra), self.context(text))

    def message(self, run_id: str, message_type: str, server_round: int, extra: dict | None = None) -> Message:
        content = RecordDict({INSTRUCTION: instruction(run_id=run_id, server_round=server_round, phase=message_type)})
        for name, record in (extra or {}).items():
            content[name] = record
        metadata = Metadata(
            run_id=1, message_id=f"m-{time.monotonic_ns()}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
            group_id="", created_at=time.time(), ttl=600.0, message_type=message_type,
        )  # fmt: skip
        return Message(content=content, metadata=metadata)

    def context(self, text: str) -> Context:
        return Context(run_id=1, node_id=7, node_config={"site-file": str(self.site_file)}, state=RecordDict(), run_config={CONFIG_YAML_KEY: text})

    def peer_statistics(self, task, site_index: int, run_id: str, *, status: str = "statistics", server_round: int = 0, tamper=None):
        raw = task.load_site_unnormalised(site_index)
        vector = statistics_vector(raw.x_train, task.feature_reference(), length=513)
        if tamper is not None:
            tamper(vector)
        record = PlainSiteCodec().pack(vector, num_examples=raw.num_train, run_id=run_id)
        claim = ReplyClaim(
            kind="update", run_id=run_id, server_round=server_round, site_id=SITES[site_index],
            payload_sha256=payload_sha256(record), num_examples=raw.num_train, status=status,
        )  # fmt: skip
        return record, (claim, sign_claim(load_site_kit(self.kits[SITES[site_index]]).signing_key, claim))


def statistics_records(updates: list, *, aggregate=None, sent_aggregate=None, certificate_round: int = 0) -> dict:
    """What a coordinator sends: the certified statistics sum (or `sent_aggregate` in its place) and updates, packed, and the certificate."""
    summed = aggregate if aggregate is not None else PlainSiteCodec().sum([record for record, _ in updates])
    certificate = RoundCertificate(certificate_round, payload_sha256(summed), tuple(signed for _, signed in updates))
    payloads = {STATISTICS_AGGREGATE: summed if sent_aggregate is None else sent_aggregate}
    for index, (record, _) in enumerate(updates):
        payloads[certified_record_name(index, prefix=STATISTICS_CERTIFIED_PREFIX)] = record
    return {STATISTICS_INPUTS: pack_payloads(payloads), STATISTICS_CERTIFICATE: certificate.to_record()}


def status_of(reply: Message) -> tuple[str, str]:
    record = reply.content.config_records[SITE]
    return str(record["status"]), str(record.get("reason", ""))


@pytest.fixture
def federation(tmp_path: Path) -> Federation:
    return Federation(tmp_path)


def test_a_site_sends_signed_statistics_and_trains_only_on_certified_plausible_ones(federation: Federation) -> None:
    run_id, text = federation.proposal()
    site = load_site(federation.site_file, text)
    task = site.task  # the site's own task settings (its site file's), as its peers'
    reply = federation.ask(text, run_id=run_id, message_type="query", server_round=0)
    claim, _ = claim_from_site_record(reply.content.config_records[SITE])
    own = task.load_site_unnormalised(0)
    assert claim.status == "statistics" and claim.server_round == 0 and claim.num_examples == own.num_train
    assert claim.payload_sha256 == payload_sha256(reply.content.array_records[UPDATE])
    mine = (reply.content.array_records[UPDATE], (claim, bytes(reply.content.config_records[SITE]["signature"])))
    honest = [mine, federation.peer_statistics(task, 1, run_id), federation.peer_statistics(task, 2, run_id)]

    # the honest path: the site z-scores with the union's statistics, and trains
    normalised = normalised_site(site, federation.message(run_id, "train", 1, statistics_records(honest)))
    union = np.concatenate([task.load_site_unnormalised(index).x_train for index in range(3)])
    expected = (own.x_train - union.mean(axis=0)) / (union.std(axis=0, ddof=1) + STD_EPSILON)
    np.testing.assert_allclose(normalised.data.x_train, expected, atol=1e-4)
    assert status_of(federation.ask(text, run_id=run_id, message_type="train", server_round=1, extra=statistics_records(honest)))[0] == "trained"

    def refused(extra: dict | None) -> str:
        status, reason = status_of(federation.ask(text, run_id=run_id, message_type="train", server_round=1, extra=extra))
        assert status == "refused:unverified_aggregate", reason
        return reason

    assert "carries none" in refused(None)  # no statistics at all
    model_claims = [federation.peer_statistics(task, 1, run_id, status="trained", server_round=0), federation.peer_statistics(task, 2, run_id, status="trained", server_round=0)]
    assert "not a statistics update" in refused(statistics_records(model_claims))  # updates of another kind
    assert "sums 1 site" in refused(statistics_records(honest[1:2]))  # too few sites
    partial = PlainSiteCodec().sum([honest[1][0], honest[2][0]])
    assert "hash differs" in refused(statistics_records(honest, aggregate=partial, sent_aggregate=PlainSiteCodec().sum([honest[0][0]])))
    # a peer that signs statistics no training rows can give (a negative variance): certified, still refused
    hostile = federation.peer_statistics(task, 2, run_id, tamper=lambda vector: vector.__setitem__(slice(60, 90), 0.0))
    assert "implausible" in refused(statistics_records([honest[0], honest[1], hostile]))


def test_a_site_refuses_federated_statistics_in_a_dp_run(federation: Federation) -> None:
    """Config load refuses it (below); a coordinator that writes the proposal by hand meets the same check at the site."""
    config = replace(compose_config(["task=breast_cancer", "privacy=dp"]), run_id=f"run-{time.monotonic_ns()}")
    document = yaml.safe_load(config_to_yaml(config))
    document["task"]["normalization"] = "federated"
    run_id, text = config.run_id, yaml.safe_dump(document)
    SiteApprovals(federation.state_dir).approve(run_id=run_id, config_hash=config_hash(text), code_hash=code_hash())
    status, reason = status_of(federation.ask(text, run_id=run_id, message_type="query", server_round=0))
    assert status == "refused:bad_proposal" and "task.normalization" in reason


# --- config load -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "text"),
    [
        (["task=vitals", "task.normalization=federated"], "task.normalization", "supports only"),
        (["task=fed_heart_disease", "task.normalization=federated"], "task.normalization", "supports only"),
        (["task=breast_cancer", "task.normalization=federated", "privacy=dp"], "task.normalization", "DP accounting"),
        (["task=breast_cancer", "task.normalization=global"], "task.normalization", "unknown normalisation"),
        (["task=csv_example", "task.normalization=federated", "task.csv.hidden_units=8"], "task.normalization", "min < max"),
    ],
)
def test_configs_federated_normalisation_cannot_serve_are_refused_naming_the_key(overrides, key: str, text: str) -> None:
    with pytest.raises(ConfigError, match=text) as error:
        compose_config(overrides)
    assert key in error.value.key


def test_defaults_keep_per_site_normalisation_and_supported_tasks_load(default_config) -> None:
    assert default_config.task.normalization == "site"
    check_normalization(compose_config(["task=diabetes_progression", "task.normalization=federated"]))
    assert compose_config(["task=fed_heart_disease"]).task.normalization == "site"


def test_a_site_normalises_a_whole_run_with_the_first_statistics_it_used(federation: Federation) -> None:
    """Every certified subset of the sites' statistics verifies, so a coordinator could z-score one round
    (or one phase) with the union of three sites and the next with two: the site pins the statistics it
    first used for the run and refuses any other set, even a validly certified one."""
    run_id, text = federation.proposal()
    task = load_site(federation.site_file, text).task
    reply = federation.ask(text, run_id=run_id, message_type="query", server_round=0)
    claim, _ = claim_from_site_record(reply.content.config_records[SITE])
    mine = (reply.content.array_records[UPDATE], (claim, bytes(reply.content.config_records[SITE]["signature"])))
    peers = [federation.peer_statistics(task, 1, run_id), federation.peer_statistics(task, 2, run_id)]
    everyone, fewer = statistics_records([mine, *peers]), statistics_records([mine, peers[0]])
    assert status_of(federation.ask(text, run_id=run_id, message_type="train", server_round=1, extra=everyone))[0] == "trained"
    status, reason = status_of(federation.ask(text, run_id=run_id, message_type="train", server_round=1, extra=fewer))
    assert status == "refused:statistics_conflict" and "other statistics" in reason, (status, reason)
    assert status_of(federation.ask(text, run_id=run_id, message_type="train", server_round=1, extra=everyone))[0] == "trained"
    other_run, other_text = federation.proposal()  # another run pins its own
    mine_there = federation.ask(other_text, run_id=other_run, message_type="query", server_round=0)
    claim, _ = claim_from_site_record(mine_there.content.config_records[SITE])
    signed = (mine_there.content.array_records[UPDATE], (claim, bytes(mine_there.content.config_records[SITE]["signature"])))
    extra = statistics_records([signed, federation.peer_statistics(task, 1, other_run)])
    assert status_of(federation.ask(other_text, run_id=other_run, message_type="train", server_round=1, extra=extra))[0] == "trained"


def test_the_harness_scores_the_federated_model_on_rows_normalised_as_the_sites_did() -> None:
    """Under federated normalisation the sites trained and evaluated on rows z-scored with the union's
    statistics: the harness's "federated" row and pooled figures must feed the model those rows, not
    each site's own z-scores (the baselines' local models keep theirs)."""
    import torch

    from medtwin.core.model_vector import model_to_vector
    from medtwin.experiments.baselines import final_model_evaluator

    config = compose_config(["task=breast_cancer", "task.num_sites=3", "task.normalization=federated", "privacy=none"])
    task = get_task(config.task)
    torch.manual_seed(3)
    weights = model_to_vector(task.build_model())
    model = task.model_with_weights(weights, seed=config.seed)
    raw = [task.load_site_unnormalised(index) for index in range(3)]
    union = np.concatenate([split.x_train for split in raw])
    mean, std = union.mean(axis=0), union.std(axis=0, ddof=1) + STD_EPSILON
    row, pooled_metrics = final_model_evaluator(config)(weights)
    for split in raw:
        expected = task.evaluate(model, ((split.x_test - mean) / std).astype(np.float32), split.y_test)
        assert row[split.site_id] == pytest.approx(expected[task.primary_metric], abs=1e-6)
    pooled_x = np.concatenate([split.x_test for split in raw])
    pooled_y = np.concatenate([split.y_test for split in raw])
    assert pooled_metrics["brier"] == pytest.approx(task.evaluate(model, ((pooled_x - mean) / std).astype(np.float32), pooled_y)["brier"], abs=1e-6)
    own = task.load_site(0)  # what the harness used before: the site's own z-scores
    assert task.evaluate(model, own.x_test, own.y_test)["brier"] != pytest.approx(pooled_metrics["brier"], abs=1e-6)
