"""A simulation process serving many virtual sites does each site's setup once, not once per message
(per-site round cost flat in the number of sites; experiments/bench_sites.py measures it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medtwin.client.site import load_site
from medtwin.core.config import PartitionConfig, TaskConfig
from medtwin.core.config.compose import compose_config
from medtwin.core.identity import ReplyClaim, SignatureError, sign_claim, signing, verify_claim
from medtwin.core.tasks import get_task
from medtwin.experiments.simulate import prepare_parties
from medtwin.server.app import make_run_id


def _config(num_sites: int, **partition: object) -> TaskConfig:
    return TaskConfig(name="breast_cancer", num_sites=num_sites, test_fraction=0.25, partition=PartitionConfig(scheme="iid", **partition))


def test_every_task_object_of_one_split_shares_the_rows_computed_once() -> None:
    first, second = get_task(_config(24)), get_task(_config(24))
    assert first.raw_splits() is second.raw_splits()  # one partition per process, not one per site's task
    fresh = first.compute_raw_splits()
    for kept, computed in zip(first.raw_splits(), fresh, strict=True):
        np.testing.assert_array_equal(kept.x_train, computed.x_train)
        np.testing.assert_array_equal(kept.y_test, computed.y_test)
    other = get_task(_config(24, min_samples_per_site=5))
    assert other.raw_splits() is not first.raw_splits()  # another split key: its own rows


def test_a_simulation_process_keeps_every_site_it_serves(tmp_path: Path) -> None:
    config = compose_config(["task=breast_cancer", "task.num_sites=12", f"runs_dir={tmp_path / 'runs'}"])
    config.run_id = make_run_id(config)
    parties = prepare_parties(config)
    paths = [parties.site_files[index] for index in sorted(parties.site_files)]
    first = [load_site(path, parties.proposal_text) for path in paths]
    again = [load_site(path, parties.proposal_text) for path in paths]  # cyclic order: an 8-site LRU misses every one
    assert [site.site_id for site in first] == [f"site{index}" for index in range(12)]
    assert all(kept is loaded for kept, loaded in zip(first, again, strict=True))


def test_a_remembered_verification_still_refuses_a_changed_claim_or_another_key() -> None:
    signing_key, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    claim = ReplyClaim(kind="update", run_id="run-1", server_round=2, site_id="site0", payload_sha256="ab" * 32, num_examples=7)
    signature = sign_claim(signing_key, claim)
    public_key = signing_key.public_key()
    before = signing._signature_holds.cache_info().hits
    verify_claim(public_key, signature, claim)
    verify_claim(public_key, signature, claim)  # the same certificate, for the next virtual site
    assert signing._signature_holds.cache_info().hits >= before + 1
    with pytest.raises(SignatureError):
        verify_claim(public_key, signature, ReplyClaim(**{**claim.to_dict(), "num_examples": 8}))
    with pytest.raises(SignatureError):
        verify_claim(stranger.public_key(), signature, claim)
    with pytest.raises(SignatureError):
        verify_claim(public_key, bytes(64), claim)
