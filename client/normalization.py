"""A site's side of `task.normalization=federated`: its statistics update, and the global statistics
it derives from the certified sum of every site's statistics — as it derives the model from updates.

Before round 1 the coordinator asks each site (a Flower "query" message, round 0) for its
statistics: per feature, the shares and moments of its TRAINING rows on the task's public reference
range, packed by the run's codec with the site's row count (core/tasks/federated_statistics.py) and
signed as an update with status "statistics". The coordinator sums the updates it accepts (under
`crypto=ckks` it only adds ciphertexts: it never sees a site's sums or their total) and sends the
sum, its round-0 certificate and the certified updates with every later message. A site then:

1. verifies the certificate exactly as a round's (every claim signed by a federation member, a
   "statistics" update of round 0 of this run, enough distinct sites, each count within
   `federation.max_site_examples`, the sum's hash is the certified one);
2. adds the certified updates up itself and decodes only that sum, whose count must be the claimed
   total (`decode_certified`);
3. refuses statistics no honest sum can give (`ImplausibleStatisticsError`: negative variance, shares
   outside [0, 1], moments beyond the reference range, non-zero padding), within the scheme's error bound;
4. pins them as the run's statistics on first use (`StatisticsRegister`, in its state folder): every
   certified subset of the sites' statistics verifies, so a later message with another set (fewer
   sites, another round's choice) is refused with `statistics_conflict`, never normalised with;
5. z-scores its train and test rows with the global mean and std (`standardise_with`).

A coordinator that sends no statistics, another round's certificate, a tampered sum or too few
sites makes the site refuse the round: it never trains or evaluates on statistics it did not derive.

Privacy: the sums are exact (no DP noise). They reveal, to the key-holding sites (and under
`crypto=plain` to the coordinator), each site's training-row count and per-feature mean and
second moment. No site's DP ledger charges them, so `federated` is refused with `privacy=dp`
(core/config/normalization.py), and a site whose policy requires DP sends none.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

from flwr.app import ArrayRecord, Message

from medtwin.core.protocol import (
    STATISTICS_AGGREGATE,
    STATISTICS_CERTIFICATE,
    STATISTICS_CERTIFIED_PREFIX,
    STATISTICS_INPUTS,
    STATISTICS_ROUND,
    STATISTICS_STATUS,
    certified_records,
    payload_sha256,
)
from medtwin.core.tasks.federated_statistics import (
    ImplausibleStatisticsError,
    standardise_with,
    standardiser_from_average,
    statistics_vector,
)
from medtwin.core.tasks.preprocessing import Standardiser

from .aggregate_check import AggregateRefused, VerifiedAggregate, decode_certified, shared_payloads, verify_certificate
from .site import Site
from .site_state import StatisticsRegister

__all__ = ["PLAIN_TOLERANCE", "StatisticsConflict", "federated_standardiser", "normalised_site", "pack_statistics", "uses_federated_statistics"]

# a plain update carries float32 values in [-1, 1] (rounding <= 2^-24) summed in float64
PLAIN_TOLERANCE = 1e-6


def uses_federated_statistics(site: Site) -> bool:
    return site.config.task.normalization == "federated"


def pack_statistics(site: Site) -> tuple[ArrayRecord, int]:
    """The site's statistics update (its codec's payload) and its count: its training rows."""
    raw = site.raw_data if site.raw_data is not None else site.data
    length = site.num_parameters
    vector = statistics_vector(raw.x_train, site.task.feature_reference(), length=length)
    return site.codec.pack(vector, num_examples=raw.num_train, run_id=site.proposal.run_id), raw.num_train


def federated_standardiser(site: Site, message: Message) -> Standardiser:
    """The global statistics from the message's certified statistics, or `AggregateRefused`."""
    content = message.content
    inputs = shared_payloads(content, STATISTICS_INPUTS)
    aggregate = inputs.get(STATISTICS_AGGREGATE)
    if aggregate is None:
        raise AggregateRefused("this run normalises with federated statistics, and the message carries none")
    verified = verify_certificate(
        content.config_records.get(STATISTICS_CERTIFICATE) if STATISTICS_CERTIFICATE in content else None,
        aggregate,
        certified_records(inputs, prefix=STATISTICS_CERTIFIED_PREFIX),
        manifest=site.kit.manifest,
        run_id=site.proposal.run_id,
        server_round=STATISTICS_ROUND,
        min_participants=max(site.file.evaluation.min_participants, site.config.federation.min_sites),
        max_site_examples=site.config.federation.max_site_examples,
        status=STATISTICS_STATUS,
    )
    average, total_rows = decode_certified(site.codec, verified, unusable="the certified statistics do not sum to usable values")
    sites = len(verified.participants)
    tolerance = site.codec.error_bound(total_examples=total_rows, num_sites=sites) if site.codec.scheme != "plain" else PLAIN_TOLERANCE
    try:
        standardiser = standardiser_from_average(average, total_rows=total_rows, reference=site.task.feature_reference(), tolerance=tolerance)
    except ImplausibleStatisticsError as error:
        raise AggregateRefused(f"the certified statistics are implausible: {error}") from None
    problem = StatisticsRegister(site.file.state_dir).pin(run_id=site.proposal.run_id, statistics_sha256=statistics_sha256(verified))
    if problem:
        raise StatisticsConflict(problem)
    return standardiser


class StatisticsConflict(AggregateRefused):
    """Validly certified statistics, but not the ones this site already normalised the run with."""

    code = "refused:statistics_conflict"


def statistics_sha256(verified: VerifiedAggregate) -> str:
    """The statistics a site used: the certified sum's digest AND the updates it summed itself."""
    digest = hashlib.sha256(f"medtwin/statistics/v1\x00{verified.aggregate_sha256}".encode())
    for update in verified.updates:
        digest.update(bytes.fromhex(payload_sha256(update)))
    return digest.hexdigest()


def normalised_site(site: Site, message: Message) -> Site:
    """`site` itself under per-site normalisation; under federated normalisation the site with its rows
    z-scored by the certified global statistics (its raw rows kept in `raw_data`)."""
    if not uses_federated_statistics(site):
        return site
    raw = site.raw_data if site.raw_data is not None else site.data
    return replace(site, data=standardise_with(raw, federated_standardiser(site, message)), raw_data=raw)
