"""bench_he_round: a tiny federation's rounds run the real site and coordinator path under both schemes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medtwin.client.aggregate_check import AggregateRefused
from medtwin.experiments import bench_he_round
from medtwin.experiments.bench_he_round import Federation, SchemeRounds, bench
from medtwin.experiments.bench_round_workloads import mlp_workload
from medtwin.core.model_vector import model_to_vector


def _tiny_workload():
    return mlp_workload(sites=2, features=6, hidden=(8,), local_steps=4, batch_size=8)


def test_both_schemes_decode_the_same_average_within_the_ckks_bound(tmp_path):
    row = bench(_tiny_workload(), rounds=1, chains=None, workdir=tmp_path)
    assert row.plain.relative_error < 1e-6  # float32 updates, float64 sums
    assert 0.0 < row.ckks.relative_error < 1e-3
    assert row.ckks.upload_bytes > row.plain.upload_bytes > 4 * row.num_parameters
    for timing in (row.plain, row.ckks):
        assert timing.train_s > 0 and timing.decode_s > 0 and timing.coordinator_s > 0 and timing.evaluate_decode_s > 0
        assert timing.chain_s == 0.0  # no chain asked for
        assert timing.to_dict()["round_s"] == pytest.approx(timing.round_s)
    assert row.ratio == pytest.approx(row.ckks.round_s / row.plain.round_s)


def test_rounds_of_the_two_schemes_are_interleaved(tmp_path, monkeypatch):
    order = []
    real_run_round = SchemeRounds.run_round

    def recording(self, server_round):
        order.append((server_round, self.scheme))
        return real_run_round(self, server_round)

    monkeypatch.setattr(SchemeRounds, "run_round", recording)
    bench(_tiny_workload(), rounds=2, chains=None, workdir=tmp_path)
    assert order == [(1, "plain"), (1, "ckks"), (2, "ckks"), (2, "plain"), (3, "plain"), (3, "ckks")]


def test_a_site_decodes_only_what_the_certificate_vouches_for(tmp_path):
    workload = _tiny_workload()
    num_parameters = int(model_to_vector(workload.build_model()).size)
    federation = Federation.create(tmp_path / "fed", sites=2, num_parameters=num_parameters, max_total_examples=workload.max_total_examples)
    run = SchemeRounds("ckks", workload, federation, workdir=tmp_path, chains=None)
    run.run_round(1)
    certified = run.previous
    assert run._site_average(0, certified).shape == (num_parameters,)
    one_update_twice = dataclasses.replace(certified, updates=[certified.updates[0], certified.updates[0]])
    with pytest.raises(AggregateRefused):
        run._site_average(0, one_update_twice)


def test_median_timing_takes_each_field_median():
    timings = [
        bench_he_round.RoundTiming(**{name: float(value) for name in ("decode_s", "train_s", "pack_s", "coordinator_s",
                                   "evaluate_decode_s", "evaluate_s", "one_machine_s", "site_chain_s",
                                   "coordinator_chain_s", "evaluate_chain_s")}, upload_bytes=10, relative_error=value / 10)
        for value in (3, 1, 2)
    ]  # fmt: skip
    median = bench_he_round._median_timing(timings)
    assert median.train_s == 2.0 and median.coordinator_chain_s == 2.0
    assert median.relative_error == pytest.approx(0.3)  # the worst, not the median
    assert np.isclose(median.chain_s / median.round_s, 3 / 9)  # 3 chain parts of the round's 9
