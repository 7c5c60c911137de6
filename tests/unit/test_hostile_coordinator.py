"""A hostile coordinator against a hospital's deployed ClientApp: the site's own file and state decide.

Each test plays the coordinator through the same ClientApp object a SuperNode loads (node_config
names only the site file; run_config carries the proposal), with real keys, real Opacus accounting
and the site's real ledger. Every attack must end in a refusal with a code — and the honest path
must still train, so the refusals are not vacuous.
"""

from __future__ import annotations

import builtins
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Context, Message, Metadata, RecordDict

from medtwin.client.app import build_client_app
from medtwin.client.site_state import SiteApprovals
from medtwin.core.config import compose_config, config_to_yaml
from medtwin.core.hashing import code_hash, config_hash
from medtwin.core.identity import (
    ReplyClaim,
    init_site_identity,
    join_federation,
    load_site_kit,
    provision_federation,
    sign_claim,
    verify_claim,
)
from medtwin.core.plain_payload import average_from_sum, pack_plain_update, read_plain_update, sum_plain_updates
from medtwin.core.protocol import (
    AGGREGATE,
    CERTIFICATE,
    INSTRUCTION,
    METRICS,
    ROUND_INPUTS,
    SCORE_HISTOGRAM,
    SITE,
    UPDATE,
    RoundCertificate,
    claim_from_site_record,
    evaluation_sha256,
    instruction,
    pack_payloads,
    payload_sha256,
)
from medtwin.core.runconfig import CONFIG_YAML_KEY

SITES = ("cleveland", "hungarian", "switzerland")


@dataclass
class Hospital:
    """One real site under attack (cleveland) and two peers whose keys sign honest claims."""

    root: Path
    site_file: Path
    state_dir: Path
    kits: dict[str, Path]

    def write_site_file(self, **privacy_overrides: object) -> None:
        document = yaml.safe_load(self.site_file.read_text())
        document["privacy"].update(privacy_overrides)
        self.site_file.write_text(yaml.safe_dump(document))

    def proposal(self, *overrides: str, approve: bool = True) -> tuple[str, str]:
        config = compose_config(
            ["privacy=dp", "privacy.target_epsilon=3", "privacy.target_delta=1e-5", "federation.num_rounds=1",
             "strategy.local_steps=4", "strategy.batch_size=8", *overrides]
        )  # fmt: skip
        if not config.run_id:
            config = replace(config, run_id=f"run-{time.monotonic_ns()}")
        text = config_to_yaml(config)
        if approve:
            SiteApprovals(self.state_dir).approve(run_id=config.run_id, config_hash=config_hash(text), code_hash=code_hash())
        return config.run_id, text

    def ask(
        self, text: str, *, phase: str = "train", run_id: str, server_round: int = 1, extra: dict | None = None, chains: object = None
    ) -> Message:
        content = RecordDict({INSTRUCTION: instruction(run_id=run_id, server_round=server_round, phase=phase)})
        for name, record in (extra or {}).items():
            content[name] = record
        metadata = Metadata(
            run_id=1, message_id=f"m-{time.monotonic_ns()}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
            group_id="", created_at=time.time(), ttl=600.0, message_type=phase,
        )  # fmt: skip
        context = Context(
            run_id=1, node_id=7, node_config={"site-file": str(self.site_file)}, state=RecordDict(), run_config={CONFIG_YAML_KEY: text}
        )
        app = build_client_app(approval_check_for=(lambda site_file: chains) if chains is not None else None)
        return app(Message(content=content, metadata=metadata), context)

    def sign_peer(self, site_id: str, claim: ReplyClaim) -> bytes:
        return sign_claim(load_site_kit(self.kits[site_id]).signing_key, claim)


def status_of(reply: Message) -> tuple[str, str]:
    record = reply.content.config_records[SITE]
    return str(record["status"]), str(record.get("reason", ""))


@pytest.fixture
def hospital(tmp_path: Path) -> Hospital:
    kits = {site: tmp_path / site / "kit" for site in SITES}
    public = [init_site_identity(kits[site], site_id=site) for site in SITES]
    admin = provision_federation(tmp_path / "admin", federation_name="hostile-test", site_public_files=public)
    for site in SITES:
        join_federation(kits[site], admin.manifest_path)
    state_dir = tmp_path / "cleveland" / "state"
    site_file = tmp_path / "cleveland" / "site.yaml"
    site_file.write_text(
        yaml.safe_dump(
            {
                "site_id": "cleveland",
                "data": {"builtin": {"task": "fed_heart_disease", "index": 0}},
                "accept": {"tasks": ["fed_heart_disease"], "max_rounds": 20, "max_local_steps": 100},
                "privacy": {"max_epsilon": 3.0, "max_delta": 1e-4, "max_total_epsilon": 10.0},
                "evaluation": {"release": "exact", "min_participants": 2, "score_histogram": True},
                "approvals": "local",
                "kit_dir": str(kits["cleveland"]),
                "state_dir": str(state_dir),
            }
        )
    )
    return Hospital(root=tmp_path, site_file=site_file, state_dir=state_dir, kits=kits)


def test_the_honest_path_trains_and_signs_its_update(hospital: Hospital) -> None:
    run_id, text = hospital.proposal()
    reply = hospital.ask(text, run_id=run_id)
    claim, signature = claim_from_site_record(reply.content.config_records[SITE])
    assert claim.status == "trained" and UPDATE in reply.content
    assert claim.payload_sha256 == payload_sha256(reply.content.array_records[UPDATE])
    assert 0 < claim.epsilon <= 3.0 and claim.delta == 1e-5
    verify_claim(load_site_kit(hospital.kits["cleveland"]).manifest.site("cleveland").signing_public_key, signature, claim)


def test_a_request_without_dp_is_refused_when_the_site_requires_it(hospital: Hospital) -> None:
    run_id, text = hospital.proposal("privacy=none")
    reply = hospital.ask(text, run_id=run_id)
    status, reason = status_of(reply)
    assert status == "refused:policy" and "requires DP" in reason
    assert UPDATE not in reply.content and METRICS not in reply.content  # not even a training loss


def test_fresh_run_ids_do_not_escape_the_lifetime_cap(hospital: Hospital) -> None:
    outcomes = []
    for _ in range(5):
        run_id, text = hospital.proposal()  # a whole run at ε=3 under a brand-new run id
        outcomes.append(status_of(hospital.ask(text, run_id=run_id)))
    assert [status for status, _ in outcomes[:3]] == ["trained"] * 3
    assert all(status == "refused:budget" for status, _ in outcomes[3:]), outcomes
    assert "max_total_epsilon" in outcomes[3][1]
    ledger = json.loads((hospital.state_dir / "privacy-ledger.json").read_text())["ledger"]
    assert len(ledger["runs"]) == 3


def test_an_unapproved_run_is_refused(hospital: Hospital) -> None:
    run_id, text = hospital.proposal(approve=False)
    assert status_of(hospital.ask(text, run_id=run_id))[0] == "refused:not_approved"


def test_a_changed_proposal_text_is_a_different_unapproved_config(hospital: Hospital) -> None:
    run_id, text = hospital.proposal()
    tampered = text.replace("target_epsilon: 3.0", "target_epsilon: 2.0")
    assert tampered != text
    assert status_of(hospital.ask(tampered, run_id=run_id))[0] == "refused:not_approved"


def test_interpolation_is_refused_without_touching_the_environment(hospital: Hospital, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDTWIN_SITE_SECRET", "0xdeadbeef-chain-key")
    run_id, text = hospital.proposal()
    hostile = text.replace("name: fed_heart_disease", "name: ${oc.env:MEDTWIN_SITE_SECRET}", 1)
    reply = hospital.ask(hostile, run_id=run_id)
    status, reason = status_of(reply)
    assert status == "refused:interpolation"
    assert "deadbeef" not in json.dumps({key: str(value) for key, value in reply.content.config_records[SITE].items()})
    claim, signature = claim_from_site_record(reply.content.config_records[SITE])  # even this refusal is signed
    manifest = load_site_kit(hospital.kits["cleveland"]).manifest
    verify_claim(manifest.site("cleveland").signing_public_key, signature, claim)
    assert (claim.run_id, claim.status) == (run_id, "refused:interpolation")


def test_a_path_in_the_proposal_is_refused_without_opening_it(hospital: Hospital, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_file = hospital.root / "hospital-secrets.csv"
    secret_file.write_text("patient,diagnosis\n1,x\n")
    opened: list[str] = []
    real_open = builtins.open

    def watching_open(file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if str(file) == str(secret_file):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watching_open)
    run_id, text = hospital.proposal()
    document = yaml.safe_load(text)
    document["task"]["csv"] = {"site_files": [str(secret_file)], "target": "diagnosis"}
    reply = hospital.ask(yaml.safe_dump(document), run_id=run_id)
    assert status_of(reply)[0] == "refused:path_in_proposal"
    assert opened == []


def test_a_run_id_that_escapes_a_folder_is_refused(hospital: Hospital) -> None:
    _, text = hospital.proposal()
    document = yaml.safe_load(text)
    document["run_id"] = "../../outside"
    reply = hospital.ask(yaml.safe_dump(document), run_id="../../outside")
    assert status_of(reply)[0] == "refused:bad_run_id"
    assert not (hospital.root / "outside").exists() and not list(hospital.root.rglob("*outside*"))


def test_hyperparameters_beyond_the_site_file_bounds_are_refused(hospital: Hospital) -> None:
    run_id, text = hospital.proposal("federation.num_rounds=50")
    status, reason = status_of(hospital.ask(text, run_id=run_id))
    assert status == "refused:over_limit" and "max_rounds 20 by 30" in reason
    run_id, text = hospital.proposal("strategy.local_steps=1000")
    assert status_of(hospital.ask(text, run_id=run_id))[0] == "refused:over_limit"


def _peer_update(hospital: Hospital, site_id: str, *, run_id: str, server_round: int, num_examples: int) -> tuple:
    weights = np.random.default_rng(len(site_id)).normal(size=14)
    record = pack_plain_update(weights, num_examples=num_examples)
    claim = ReplyClaim(
        kind="update", run_id=run_id, server_round=server_round, site_id=site_id, payload_sha256=payload_sha256(record),
        num_examples=num_examples, epsilon=0.5, delta=1e-5, dataset_manifest="ab" * 32, status="trained",
    )  # fmt: skip
    return record, (claim, hospital.sign_peer(site_id, claim))


def _sum_records(records: list) -> object:
    return sum_plain_updates(records)


def _round_records(aggregate, claims, updates, *, certified_hash=None) -> dict:
    """What a coordinator sends with an aggregate: the aggregate, its certificate, the certified updates."""
    from medtwin.core.protocol import certified_record_name

    certificate = RoundCertificate(
        server_round=claims[0][0].server_round if claims else 1,
        aggregate_sha256=certified_hash or payload_sha256(aggregate),
        claims=tuple(claims),
    )
    payloads = {AGGREGATE: aggregate, **{certified_record_name(index): update for index, update in enumerate(updates)}}
    return {ROUND_INPUTS: pack_payloads(payloads), CERTIFICATE: certificate.to_record()}


def _expected_metrics(hospital: Hospital, summed) -> dict[str, float]:
    """What cleveland's test set says about the model a sum of updates encodes (computed here, independently)."""
    from medtwin.core.config import TaskConfig
    from medtwin.core.model_vector import vector_to_model
    from medtwin.core.tasks import get_task

    task = get_task(TaskConfig(name="fed_heart_disease"))
    model = task.build_model()
    vector_to_model(model, average_from_sum(summed)[0])
    data = task.load_site(0)
    return task.evaluate(model, data.x_test, data.y_test)


def _expected_histogram(summed) -> dict[str, list]:
    """cleveland's per-class score histogram of that model, from the scores computed here."""
    import torch

    from medtwin.core.config import TaskConfig
    from medtwin.core.model_vector import vector_to_model
    from medtwin.core.score_histogram import ScoreHistogram
    from medtwin.core.tasks import get_task

    task = get_task(TaskConfig(name="fed_heart_disease"))
    model = task.build_model()
    vector_to_model(model, average_from_sum(summed)[0])
    data = task.load_site(0)
    with torch.no_grad():
        scores = model.eval()(torch.from_numpy(data.x_test)).reshape(-1).numpy()
    return ScoreHistogram.of_scores(data.y_test, scores).to_values()


def test_a_coordinator_cannot_substitute_the_aggregate_a_site_decodes(hospital: Hospital) -> None:
    """The site sums the certified updates itself: one site's update (scaled to the claimed count), a
    made-up probe model or a partial sum never reaches its model, whatever the coordinator calls the aggregate."""
    run_id, text = hospital.proposal("federation.num_rounds=3")
    hungarian, hungarian_claim = _peer_update(hospital, "hungarian", run_id=run_id, server_round=1, num_examples=180)
    swiss, swiss_claim = _peer_update(hospital, "switzerland", run_id=run_id, server_round=1, num_examples=80)
    honest = _sum_records([hungarian, swiss])
    scaled_single = pack_plain_update(read_plain_update(hungarian).weights, num_examples=260)  # hungarian alone, count fixed
    claims = [hungarian_claim, swiss_claim]
    dominant, dominant_claim = _peer_update(hospital, "hungarian", run_id=run_id, server_round=1, num_examples=5_000_000)
    refused = {
        "no certificate": {ROUND_INPUTS: pack_payloads({AGGREGATE: hungarian})},
        "certified updates missing": _round_records(scaled_single, claims, [hungarian]),
        "one update sent twice": _round_records(scaled_single, claims, [hungarian, hungarian]),
        "certificate of one site only": _round_records(hungarian, [hungarian_claim], [hungarian]),
        "an update that is not the signed one": _round_records(honest, claims, [hungarian, scaled_single]),
        "aggregate other than certified": _round_records(scaled_single, claims, [hungarian, swiss], certified_hash=payload_sha256(honest)),
        "a site claiming 5M examples": _round_records(
            _sum_records([dominant, swiss]), [dominant_claim, swiss_claim], [dominant, swiss]
        ),
        "payloads not packed as one array": _round_records(honest, claims, [hungarian, swiss]) | {ROUND_INPUTS: honest},
    }
    for name, extra in refused.items():
        status, reason = status_of(hospital.ask(text, run_id=run_id, server_round=2, extra=extra))
        assert status == "refused:unverified_aggregate", (name, status, reason)
    # the coordinator names its forged model as the aggregate, consistently: the site evaluates the honest sum
    forged = _round_records(scaled_single, claims, [hungarian, swiss])
    reply = hospital.ask(text, phase="evaluate", run_id=run_id, server_round=1, extra=forged)
    released = dict(reply.content.metric_records[METRICS])
    assert released.pop("num_parameters") > 0
    assert released == pytest.approx(_expected_metrics(hospital, honest))  # exact: every metric, the honest sum's
    assert status_of(hospital.ask(text, run_id=run_id, server_round=2, extra=_round_records(honest, claims, [hungarian, swiss])))[0] == "trained"


def test_a_second_evaluation_of_the_same_round_releases_nothing_new(hospital: Hospital) -> None:
    """Asked again for the same aggregate (a resumed coordinator does that), the site resends the reply it
    already signed, byte for byte; asked for the same round with another aggregate, it refuses."""
    run_id, text = hospital.proposal("federation.num_rounds=3")
    hungarian, hungarian_claim = _peer_update(hospital, "hungarian", run_id=run_id, server_round=1, num_examples=180)
    swiss, swiss_claim = _peer_update(hospital, "switzerland", run_id=run_id, server_round=1, num_examples=80)
    aggregate = _sum_records([hungarian, swiss])
    extra = _round_records(aggregate, [hungarian_claim, swiss_claim], [hungarian, swiss])
    first = hospital.ask(text, phase="evaluate", run_id=run_id, server_round=1, extra=extra)
    claim, _ = claim_from_site_record(first.content.config_records[SITE])
    assert claim.status == "evaluated" and "accuracy" in first.content.metric_records[METRICS]
    exact = first.content.metric_records[METRICS]  # this site file releases exact metrics: every defined one
    assert {"auroc", "auprc", "brier", "ece", "sensitivity", "specificity"} <= set(exact)
    assert claim.aggregate_sha256 == payload_sha256(aggregate)
    histogram = dict(first.content.metric_records[SCORE_HISTOGRAM])  # exact: the score histogram too, signed
    assert histogram == _expected_histogram(aggregate) and sum(histogram["negatives"] + histogram["positives"]) == exact["n"]
    assert claim.payload_sha256 == evaluation_sha256(dict(exact), histogram)
    again = hospital.ask(text, phase="evaluate", run_id=run_id, server_round=1, extra=extra)
    assert dict(again.content.config_records[SITE]) == dict(first.content.config_records[SITE])  # same signature
    assert dict(again.content.metric_records[METRICS]) == dict(first.content.metric_records[METRICS])
    assert dict(again.content.metric_records[SCORE_HISTOGRAM]) == histogram
    hungarian_2, hungarian_2_claim = _peer_update(hospital, "hungarian", run_id=run_id, server_round=1, num_examples=170)
    other = _round_records(_sum_records([hungarian_2, swiss]), [hungarian_2_claim, swiss_claim], [hungarian_2, swiss])
    assert status_of(hospital.ask(text, phase="evaluate", run_id=run_id, server_round=1, extra=other))[0] == "refused:already_evaluated"


def test_rounded_and_dp_releases_follow_the_site_file(hospital: Hospital) -> None:
    document = yaml.safe_load(hospital.site_file.read_text())
    document["evaluation"] = {"release": "rounded", "decimals": 2, "min_participants": 2, "score_histogram": True}
    hospital.site_file.write_text(yaml.safe_dump(document))
    run_id, text = hospital.proposal("federation.num_rounds=2")
    hungarian, hungarian_claim = _peer_update(hospital, "hungarian", run_id=run_id, server_round=1, num_examples=180)
    swiss, swiss_claim = _peer_update(hospital, "switzerland", run_id=run_id, server_round=1, num_examples=80)
    aggregate = _sum_records([hungarian, swiss])
    extra = _round_records(aggregate, [hungarian_claim, swiss_claim], [hungarian, swiss])
    rounded_reply = hospital.ask(text, phase="evaluate", run_id=run_id, extra=extra)
    rounded = dict(rounded_reply.content.metric_records[METRICS])
    expected = _expected_metrics(hospital, aggregate)
    assert {name: rounded[name] for name in expected} == {
        name: value if name == "n" else round(value, 2) for name, value in expected.items()
    }  # every clinical metric, rounded
    histogram, exact_histogram = dict(rounded_reply.content.metric_records[SCORE_HISTOGRAM]), _expected_histogram(aggregate)
    assert histogram == exact_histogram | {"score_sums": [round(total, 2) for total in exact_histogram["score_sums"]]}

    document["evaluation"] = {"release": "dp", "epsilon_per_release": 0.5, "min_participants": 2}
    hospital.site_file.write_text(yaml.safe_dump(document))
    run_id, text = hospital.proposal("federation.num_rounds=3")
    hungarian, hungarian_claim = _peer_update(hospital, "hungarian", run_id=run_id, server_round=1, num_examples=180)
    swiss, swiss_claim = _peer_update(hospital, "switzerland", run_id=run_id, server_round=1, num_examples=80)
    aggregate = _sum_records([hungarian, swiss])
    extra = _round_records(aggregate, [hungarian_claim, swiss_claim], [hungarian, swiss])
    reply = hospital.ask(text, phase="evaluate", run_id=run_id, extra=extra)
    claim, _ = claim_from_site_record(reply.content.config_records[SITE])
    assert claim.status == "evaluated" and claim.epsilon == 0.5
    ledger = json.loads((hospital.state_dir / "privacy-ledger.json").read_text())["ledger"]
    assert ledger["releases"][run_id]["1"]["epsilon"] == 0.5  # counted in the site's own ledger
    released = reply.content.metric_records[METRICS]
    assert 0.0 <= released["accuracy"] <= 1.0 and "n" in released
    assert set(released) == {"accuracy", "n", "num_parameters"}  # AUROC & co. withheld: no 1/n sensitivity
    assert SCORE_HISTOGRAM not in reply.content  # and no score histogram (client/release.py says why)


def test_under_ckks_one_sites_ciphertext_never_reaches_a_sites_decryptor(hospital: Hospital) -> None:
    """The coordinator cannot read ciphertexts, but it could forward one site's (with its count slot
    fixed up) as the "aggregate" so that every key-holding site decrypts that site's update. Sites
    decrypt only their own sum of the certified ciphertexts."""
    from medtwin.core.he import CkksParameters, ckks_parameters_from_config, encrypt_update, sum_encrypted
    from medtwin.core.identity import install_he_secret, load_site_he_context, steward_generate_he_keys
    from medtwin.core.protocol import chunks_to_record

    crypto = replace(compose_config(["crypto=ckks"]).crypto, max_total_examples=2000)
    parameters: CkksParameters = ckks_parameters_from_config(crypto, num_parameters=14, num_sites=3)
    keys = steward_generate_he_keys(hospital.kits["cleveland"], parameters, outbox_dir=hospital.root / "outbox")
    for site, envelope in keys.envelope_paths.items():
        install_he_secret(hospital.kits[site], envelope)
    run_id, text = hospital.proposal("crypto=ckks", f"crypto.key_id={keys.key_id}", "federation.num_rounds=3")

    def encrypted_update(site: str, count: int) -> tuple:
        context = load_site_he_context(hospital.kits[site], keys.key_id)
        chunks = encrypt_update(context, np.random.default_rng(count).normal(0, 0.1, 14), count)
        record = chunks_to_record(chunks)
        claim = ReplyClaim(
            kind="update", run_id=run_id, server_round=1, site_id=site, payload_sha256=payload_sha256(record),
            num_examples=count, epsilon=0.5, delta=1e-5, status="trained",
        )  # fmt: skip
        return chunks, record, (claim, hospital.sign_peer(site, claim))

    hungarian_chunks, hungarian, hungarian_claim = encrypted_update("hungarian", 180)
    swiss_chunks, swiss, swiss_claim = encrypted_update("switzerland", 80)
    public_context = keys.public_context_path.read_bytes()
    honest = chunks_to_record(sum_encrypted(public_context, [hungarian_chunks, swiss_chunks]))
    claims = [hungarian_claim, swiss_claim]
    # hungarian's ciphertext passed off as the aggregate: the site never decrypts it, only its own sum
    lying_count = _round_records(hungarian, claims, [hungarian, hungarian])
    assert status_of(hospital.ask(text, run_id=run_id, server_round=2, extra=lying_count))[0] == "refused:unverified_aggregate"
    evaluated = hospital.ask(text, phase="evaluate", run_id=run_id, server_round=1, extra=_round_records(hungarian, claims, [hungarian, swiss]))
    claim, _ = claim_from_site_record(evaluated.content.config_records[SITE])
    assert claim.status == "evaluated"
    weights = {count: np.random.default_rng(count).normal(0, 0.1, 14) for count in (180, 80)}
    plain_honest = _sum_records([pack_plain_update(weights[count], num_examples=count) for count in (180, 80)])
    plain_single = _sum_records([pack_plain_update(weights[180], num_examples=180)])
    released = evaluated.content.metric_records[METRICS]["accuracy"]
    assert released == pytest.approx(_expected_metrics(hospital, plain_honest)["accuracy"])
    assert _expected_metrics(hospital, plain_single)["accuracy"] != _expected_metrics(hospital, plain_honest)["accuracy"]
    trained = hospital.ask(text, run_id=run_id, server_round=2, extra=_round_records(honest, claims, [hungarian, swiss]))
    assert status_of(trained)[0] == "trained"


def test_a_repeated_training_instruction_gets_the_same_signed_update_and_spends_nothing_more(hospital: Hospital) -> None:
    """A resumed coordinator sends again the round it crashed in: the site answers with the update it already
    signed (its budget was spent once); the same round from another starting aggregate is a replay and refused."""
    run_id, text = hospital.proposal("federation.num_rounds=3")
    first = hospital.ask(text, run_id=run_id, server_round=1)
    assert status_of(first)[0] == "trained"
    ledger_path = hospital.state_dir / "privacy-ledger.json"
    spent = ledger_path.read_bytes()
    again = hospital.ask(text, run_id=run_id, server_round=1)
    assert dict(again.content.config_records[SITE]) == dict(first.content.config_records[SITE])
    assert payload_sha256(again.content.array_records[UPDATE]) == payload_sha256(first.content.array_records[UPDATE])
    assert ledger_path.read_bytes() == spent  # nothing trained, nothing spent
    hungarian, hungarian_claim = _peer_update(hospital, "hungarian", run_id=run_id, server_round=1, num_examples=180)
    swiss, swiss_claim = _peer_update(hospital, "switzerland", run_id=run_id, server_round=1, num_examples=80)
    one = _round_records(_sum_records([hungarian, swiss]), [hungarian_claim, swiss_claim], [hungarian, swiss])
    assert status_of(hospital.ask(text, run_id=run_id, server_round=2, extra=one))[0] == "trained"
    hungarian_2, hungarian_2_claim = _peer_update(hospital, "hungarian", run_id=run_id, server_round=1, num_examples=170)
    other = _round_records(_sum_records([hungarian_2, swiss]), [hungarian_2_claim, swiss_claim], [hungarian_2, swiss])
    assert status_of(hospital.ask(text, run_id=run_id, server_round=2, extra=other))[0] == "refused:replay"
    assert status_of(hospital.ask(text, run_id=run_id, server_round=2, extra=one))[0] == "trained"  # the stored reply


def test_a_stored_reply_is_resent_only_for_the_same_certified_updates_not_the_same_aggregate_label(hospital: Hospital) -> None:
    """The coordinator names the same aggregate but certifies other updates (so the site's own sum, its
    model, differs): no stored reply is resent — a second evaluation is refused, a second training a replay."""
    run_id, text = hospital.proposal("federation.num_rounds=3")
    hungarian, hungarian_claim = _peer_update(hospital, "hungarian", run_id=run_id, server_round=1, num_examples=180)
    hungarian_2, hungarian_2_claim = _peer_update(hospital, "hungarian", run_id=run_id, server_round=1, num_examples=170)
    swiss, swiss_claim = _peer_update(hospital, "switzerland", run_id=run_id, server_round=1, num_examples=80)
    label = _sum_records([hungarian, swiss])
    first = _round_records(label, [hungarian_claim, swiss_claim], [hungarian, swiss])
    relabelled = _round_records(label, [hungarian_2_claim, swiss_claim], [hungarian_2, swiss])
    for phase, refused in (("evaluate", "refused:already_evaluated"), ("train", "refused:replay")):
        assert status_of(hospital.ask(text, phase=phase, run_id=run_id, server_round=2 if phase == "train" else 1, extra=first))[0] in (
            "evaluated", "trained",
        )  # fmt: skip
        status, _ = status_of(hospital.ask(text, phase=phase, run_id=run_id, server_round=2 if phase == "train" else 1, extra=relabelled))
        assert status == refused, (phase, status)


def test_a_site_that_cannot_keep_its_reply_still_sends_it_and_a_damaged_store_is_not_resent(
    hospital: Hospital, monkeypatch: pytest.MonkeyPatch
) -> None:
    from medtwin.client import reply_store

    run_id, text = hospital.proposal("federation.num_rounds=3")

    def disk_full(*_: object, **__: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(reply_store, "atomic_write_text", disk_full)
        assert status_of(hospital.ask(text, run_id=run_id, server_round=1))[0] == "trained"  # spent, and sent
    assert status_of(hospital.ask(text, run_id=run_id, server_round=1))[0] == "refused:replay"  # nothing kept: no resend
    assert status_of(hospital.ask(text, run_id=run_id, server_round=1, extra={}))[0] == "refused:replay"
    _, text_2 = hospital.proposal("federation.num_rounds=4")
    run_2 = yaml.safe_load(text_2)["run_id"]
    assert status_of(hospital.ask(text_2, run_id=run_2, server_round=1))[0] == "trained"
    (stored,) = (hospital.state_dir / "replies" / run_2).glob("train-*.json")
    stored.write_text("[1, 2]")  # damaged
    assert status_of(hospital.ask(text_2, run_id=run_2, server_round=1))[0] == "refused:replay"


class ChainWitness:
    """The site's reader of the chains (a RunApprovalCheck), with a scripted data-chain history."""

    def __init__(self, earlier_dp_runs: list[str]) -> None:
        self.earlier_dp_runs, self.asked = earlier_dp_runs, 0

    def problem(self, **binding: str) -> None:
        return None

    def aggregate_problem(self, **binding: object) -> None:
        return None

    def erased_ledger_problem(self, *, site_id: str, ledger_path: str) -> str | None:
        self.asked += 1
        return f"the data chain records {site_id}'s datasets in {self.earlier_dp_runs}" if self.earlier_dp_runs else None


def test_a_site_whose_ledger_and_mark_were_both_deleted_does_not_start_over(hospital: Hospital) -> None:
    """The kit's mark catches a deleted ledger; deleting both is caught by the data chain's record of the
    site's earlier DP runs. A new site (no history on chain) trains; the chain is asked only while the
    ledger holds no spend."""
    run_id, text = hospital.proposal()
    status, reason = status_of(hospital.ask(text, run_id=run_id, chains=ChainWitness(["run-2025-a"])))
    assert status == "refused:ledger" and "run-2025-a" in reason
    assert not (hospital.state_dir / "privacy-ledger.json").exists() or not json.loads(
        (hospital.state_dir / "privacy-ledger.json").read_text()
    )["ledger"]["runs"]  # nothing spent by the refusal

    fresh = ChainWitness([])
    assert status_of(hospital.ask(text, run_id=run_id, chains=fresh))[0] == "trained" and fresh.asked == 1
    run_id, text = hospital.proposal()
    later = ChainWitness(["whatever"])
    assert status_of(hospital.ask(text, run_id=run_id, chains=later))[0] == "trained" and later.asked == 0  # its ledger has spends



class AnchorWitness(ChainWitness):
    """A chain reader whose data chain has (or has not yet) the round's anchor."""

    def __init__(self, anchored: bool) -> None:
        super().__init__([])
        self.anchored, self.anchor_reads = anchored, 0

    def aggregate_problem(self, **binding: object) -> str | None:
        self.anchor_reads += 1
        return None if self.anchored else "the data chain holds no anchor of this aggregate for round 1"


def test_an_unanchored_aggregate_is_refused_and_nothing_is_recorded_spent_or_released(hospital: Hospital) -> None:
    """The site computes an evaluation while the round's anchor lands, but records, spends and releases nothing
    before the anchor check: refused as unanchored, the same aggregate is evaluated once it is anchored."""
    document = yaml.safe_load(hospital.site_file.read_text())
    document["approvals"] = "chain"
    document["chain"] = {"state_dir": str(hospital.root / "chain-record")}
    document["evaluation"] = {"release": "dp", "epsilon_per_release": 0.5, "min_participants": 2}
    hospital.site_file.write_text(yaml.safe_dump(document))
    run_id, text = hospital.proposal("federation.num_rounds=3")
    hungarian, hungarian_claim = _peer_update(hospital, "hungarian", run_id=run_id, server_round=1, num_examples=180)
    swiss, swiss_claim = _peer_update(hospital, "switzerland", run_id=run_id, server_round=1, num_examples=80)
    extra = _round_records(_sum_records([hungarian, swiss]), [hungarian_claim, swiss_claim], [hungarian, swiss])
    ledger = hospital.state_dir / "privacy-ledger.json"
    spent_before = ledger.read_bytes() if ledger.exists() else b""
    missing = AnchorWitness(anchored=False)
    status, reason = status_of(hospital.ask(text, phase="evaluate", run_id=run_id, server_round=1, extra=extra, chains=missing))
    assert status == "refused:unanchored" and "no anchor" in reason and missing.anchor_reads == 1
    assert (ledger.read_bytes() if ledger.exists() else b"") == spent_before  # no release reserved
    assert not list((hospital.state_dir / "replies").rglob("evaluate-*"))  # no reply kept to resend
    landed = AnchorWitness(anchored=True)
    reply = hospital.ask(text, phase="evaluate", run_id=run_id, server_round=1, extra=extra, chains=landed)
    assert status_of(reply)[0] == "evaluated" and landed.anchor_reads == 1  # not "already evaluated": nothing was recorded
    assert ledger.read_bytes() != spent_before  # the release is spent now, once


def _vitals_site(hospital: Hospital, streams: str, *, accept_vitals: dict | None = None) -> None:
    """Cleveland becomes a hospital that brings its own vital-sign streams (a long-format CSV)."""
    (hospital.root / "cleveland" / "vitals.csv").write_text(streams)
    document = yaml.safe_load(hospital.site_file.read_text())
    document["data"] = {"vitals": {"path": "vitals.csv", "test_fraction": 0.5}}
    document["accept"]["tasks"] = ["vitals"]
    if accept_vitals is not None:
        document["accept"]["vitals"] = accept_vitals
    hospital.site_file.write_text(yaml.safe_dump(document))


def _streams(patients: int, hours: int) -> str:
    rows = ["patient_id,timestamp,signal,value"]
    for patient in range(patients):
        for minute in range(0, hours * 60, 15):
            when = f"2026-03-0{1 + minute // 1440}T{(minute // 60) % 24:02d}:{minute % 60:02d}:00"
            rows += [f"p{patient},{when},hr,{70 + patient + (minute // 15) % 5}", f"p{patient},{when},rr,{14 + (minute // 15) % 3}",
                     f"p{patient},{when},spo2,97", f"p{patient},{when},sbp,{120 + (minute // 15) % 7}", f"p{patient},{when},temp,36.9"]  # fmt: skip
    return "\n".join(rows) + "\n"


def test_a_hospital_trains_the_vitals_twin_on_its_own_streams_with_the_proposals_window(hospital: Hospital) -> None:
    _vitals_site(hospital, _streams(patients=4, hours=8))
    run_id, text = hospital.proposal("task=vitals", "task.vitals.window_h=2", "task.vitals.horizon_h=0.5", "strategy.batch_size=8")
    reply = hospital.ask(text, run_id=run_id)
    assert status_of(reply)[0] == "trained", status_of(reply)
    from medtwin.core.tasks import get_task

    def parameters(*overrides: str) -> int:
        return sum(p.numel() for p in get_task(compose_config(["task=vitals", *overrides]).task).build_model().parameters())

    sent = read_plain_update(reply.content.array_records[UPDATE]).weights.size
    assert sent == parameters("task.vitals.horizon_h=0.5")  # the proposal's horizon shaped the model...
    assert parameters("task.vitals.horizon_h=0.5") != parameters()
    assert claim_from_site_record(reply.content.config_records[SITE])[0].num_examples > 0  # ...the site's streams fed it


def test_a_broken_stream_is_refused_signed_without_its_contents(hospital: Hospital) -> None:
    _vitals_site(hospital, _streams(patients=3, hours=6) + "p9,2026-03-01T08:00:00,hr,999\n")
    run_id, text = hospital.proposal("task=vitals")
    status, reason = status_of(hospital.ask(text, run_id=run_id))
    assert status == "refused:data" and "1 problem(s)" in reason and "999" not in reason  # no patient value leaves the site


def test_a_proposal_cannot_stretch_the_vitals_window_beyond_its_bounds(hospital: Hospital) -> None:
    _vitals_site(hospital, _streams(patients=4, hours=8))
    run_id, text = hospital.proposal("task=vitals", "task.vitals.window_h=100")
    status, reason = status_of(hospital.ask(text, run_id=run_id))
    assert status == "refused:over_limit" and "accept.vitals.window_h [0.25, 24]" in reason, (status, reason)
    run_id, text = hospital.proposal("task=vitals", "task.vitals.window_h=20")  # allowed, but longer than this site's stays
    assert status_of(hospital.ask(text, run_id=run_id))[0] == "refused:data"
    run_id, text = hospital.proposal("task=vitals", "task.vitals.window_h=20", "task.vitals.horizon_h=6")  # no crash either way
    assert status_of(hospital.ask(text, run_id=run_id))[0] in ("refused:data", "refused:bad_proposal")
    run_id, text = hospital.proposal("task=vitals", "task.vitals.grid_min=1")  # a 1-minute grid would multiply the windows
    status, reason = status_of(hospital.ask(text, run_id=run_id))
    assert status == "refused:over_limit" and "accept.vitals.grid_min" in reason


def test_a_site_narrows_the_vitals_window_in_its_own_file_and_the_coordinator_cannot_widen_it(hospital: Hospital) -> None:
    _vitals_site(hospital, _streams(patients=4, hours=8), accept_vitals={"window_h": [1, 2]})
    run_id, text = hospital.proposal("task=vitals", "task.vitals.window_h=3")  # within the default bound, not this site's
    status, reason = status_of(hospital.ask(text, run_id=run_id))
    assert status == "refused:over_limit" and "accept.vitals.window_h [1, 2]" in reason, (status, reason)
    assert "task.vitals.window_h 3" in reason
    run_id, text = hospital.proposal("task=vitals", "task.vitals.window_h=2", "task.vitals.horizon_h=0.5", "strategy.batch_size=8")
    assert status_of(hospital.ask(text, run_id=run_id))[0] == "trained"


def test_the_vitals_twin_spends_privacy_per_patient_whatever_the_proposal_says(hospital: Hospital) -> None:
    """A patient owns dozens of windows. The coordinator cannot make each window count as a patient
    (a tiny sample rate, a flattering epsilon): the site's ledger accounts its training patients."""
    from medtwin.core.tasks.vitals_task import _split_patients

    _vitals_site(hospital, _streams(patients=6, hours=8))
    patients = len(_split_patients([f"p{index}" for index in range(6)], 43, 0.5)[0])  # the site file's split (seed 43)
    assert 2 <= patients <= 5
    spends = {}
    for unit_rows in (8, 1):
        run_id, text = hospital.proposal("task=vitals", "task.vitals.window_h=2", "strategy.batch_size=8", f"privacy.unit_rows={unit_rows}")
        assert status_of(hospital.ask(text, run_id=run_id))[0] == "trained"
        ledger = json.loads((hospital.state_dir / "privacy-ledger.json").read_text())["ledger"]
        spends[unit_rows] = ledger["runs"][run_id]["rounds"]["1"]
    assert spends[8]["sample_rate"] == 1 / patients  # 8 windows / 8 per patient = 1 patient a step (of ~60 windows)
    assert spends[1]["sample_rate"] == 1.0  # 8 patients a step asked, all taken: no amplification
    assert spends[1]["epsilon"] > spends[8]["epsilon"]


def test_under_fedadam_the_site_applies_the_step_from_its_own_state_and_refuses_a_mixed_or_skipped_history(hospital: Hospital) -> None:
    """The coordinator only sums: the site evaluates and trains from the Adam step it applied itself to the
    average, from state it holds; peers' updates must name that state, and a skipped round is refused."""
    from medtwin.client.app import initial_model
    from medtwin.client.global_state import initial_global_state
    from medtwin.client.server_optimizer import OptimizerMoments, ServerOptimizerSettings, server_step
    from medtwin.core.config import TaskConfig
    from medtwin.core.model_vector import model_to_vector, vector_to_model
    from medtwin.core.tasks import get_task

    run_id, text = hospital.proposal("strategy=fedadam", "strategy.local_steps=4", "strategy.batch_size=8", "federation.num_rounds=3")
    settings = ServerOptimizerSettings.from_strategy(compose_config(["strategy=fedadam"]).strategy)
    task = get_task(TaskConfig(name="fed_heart_disease"))
    start = initial_global_state(run_id=run_id, settings=settings, weights=model_to_vector(initial_model(task, seed=42)))
    trained = hospital.ask(text, run_id=run_id, server_round=1)
    claim, _ = claim_from_site_record(trained.content.config_records[SITE])
    assert claim.status == "trained" and claim.aggregate_sha256 == start.sha256  # it names the state it trained from

    def peers(started_from: str, *, run_id: str = run_id, server_round: int = 1) -> tuple[dict, object]:
        records, claims = [], []
        for site_id, count in (("hungarian", 180), ("switzerland", 80)):
            record, (peer_claim, _) = _peer_update(hospital, site_id, run_id=run_id, server_round=server_round, num_examples=count)
            peer_claim = replace(peer_claim, aggregate_sha256=started_from)
            records.append(record)
            claims.append((peer_claim, hospital.sign_peer(site_id, peer_claim)))
        return _round_records(_sum_records(records), claims, records), _sum_records(records)

    honest, summed = peers(start.sha256)
    reply = hospital.ask(text, phase="evaluate", run_id=run_id, server_round=1, extra=honest)
    assert status_of(reply)[0] == "evaluated"
    stepped, _ = server_step(
        settings, weights=start.weights, moments=OptimizerMoments.zeros(start.weights.size), average=average_from_sum(summed)[0], server_round=1
    )  # fmt: skip
    model = task.build_model()
    vector_to_model(model, stepped)
    data = task.load_site(0)
    expected = task.evaluate(model, data.x_test, data.y_test)
    released = reply.content.metric_records[METRICS]
    assert released["accuracy"] == pytest.approx(expected["accuracy"])  # the Adam step's model, not the bare average
    assert _expected_metrics(hospital, summed)["brier"] != pytest.approx(expected["brier"])
    assert status_of(hospital.ask(text, run_id=run_id, server_round=2, extra=honest))[0] == "trained"

    # a new run: updates that name no state (or another one) are not stepped from; nor is a round this site never saw
    fresh_run, fresh_text = hospital.proposal("strategy=fedadam", "strategy.local_steps=4", "strategy.batch_size=8", "federation.num_rounds=3")
    unanchored, _ = peers("", run_id=fresh_run)
    status, reason = status_of(hospital.ask(fresh_text, run_id=fresh_run, server_round=2, extra=unanchored))
    assert status == "refused:state_mismatch", (status, reason)
    round_two, _ = peers(start.sha256, run_id=fresh_run, server_round=2)
    status, reason = status_of(hospital.ask(fresh_text, run_id=fresh_run, server_round=3, extra=round_two))
    assert status == "refused:missing_state" and "round 1" in reason, (status, reason)
