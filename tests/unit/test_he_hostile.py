"""Hostile sites against the SEAL (tenseal.sealapi) CKKS codec: two attacks a review found, now refused.

1. A registered site can abort() the coordinator (and, relayed, every site): SEAL 4.1's streaming zstd
   inflater (`seal::util::ztools::InflateGetBuffer`) calls `stream.clear()` in its destructor, which
   throws `std::ios_base::failure` out of a noexcept destructor when the inflated object is shorter than
   what `Ciphertext::load_members` reads -> `std::terminate`. The chunk is well-formed up to SEAL's
   zstd body and under the size cap; nothing medtwin does before `Ciphertext.load` can see it.
   Each attempt runs in a subprocess so an abort would show as a return code. Fixed: peers' bytes are
   inflated in Python with a cap (core/he/seal_io.py) and SEAL only reads uncompressed objects.
2. `check_decoded_sum` gets `decryption_error_bound` in value units (the count slot holds n * B), so its
   count tolerance is B times too loose: a site can pack a count off by one (or more) from the one it
   signs and every honest site still accepts the round. Fixed: the count's bound is the slot's over B.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from medtwin.client.aggregate_check import (
    AggregateRefused,
    VerifiedAggregate,
    check_decoded_sum,
)
from medtwin.client.codec import CkksSiteCodec
from medtwin.core.he import (
    choose_ckks_parameters,
    create_secret_context,
    decrypt_average,
    encrypt_update,
    sum_encrypted,
)

_ABORTING_CHUNK = textwrap.dedent(
    """
    import struct, sys
    from types import SimpleNamespace
    import numpy as np
    from flwr.app import ArrayRecord
    from medtwin.core.he import (choose_ckks_parameters, create_secret_context, load_context,
                                 serialize_public_context, encrypt_update, sum_encrypted)
    from medtwin.core.he.codec import CHUNK_HEADER
    from medtwin.core.protocol import chunks_to_record
    from medtwin.server.aggregation import CkksAggregator, SiteUpdate

    def seal_header(size, compr):
        return struct.pack("<HBBBBHQ", 0xA15E, 16, 4, 3, compr, 0, size)

    def zstd_raw_frame(data):  # a valid zstd frame of raw (stored) blocks
        out, block = b"\\x28\\xb5\\x2f\\xfd\\x00\\x38", 128 * 1024
        pieces = [data[i:i + block] for i in range(0, len(data), block)]
        for i, piece in enumerate(pieces):
            out += ((i == len(pieces) - 1) | len(piece) << 3).to_bytes(3, "little") + piece
        return out

    params = choose_ckks_parameters(num_parameters=3000, num_sites=3, max_abs_weight_bound=2.0, max_total_examples=1000)
    secret = create_secret_context(params)
    coordinator = load_context(serialize_public_context(secret), expected_kind="public")
    honest = encrypt_update(secret, np.zeros(params.num_parameters), 1)
    n = params.poly_modulus_degree
    # Ciphertext members as SEAL writes them (seeded), but the data array 13 bytes short
    members = struct.pack("<4Q", *secret.seal_context.first_parms_id()) + b"\\x01"
    members += struct.pack("<QQQdQ", 2, n, 1, 2.0 ** params.scale_bits, 1)
    members += seal_header(16 + 8 + 8 * n, 0) + struct.pack("<Q", n) + b"\\x00" * (8 * n - 13)
    members += seal_header(16 + 1 + 64, 0) + b"\\x01" + b"\\x07" * 64
    frame = zstd_raw_frame(members)
    chunk = honest[0][: CHUNK_HEADER.size] + seal_header(16 + len(frame), 2) + frame
    if sys.argv[1] == "coordinator":
        update = SiteUpdate(node_id=1, record=chunks_to_record([chunk]), claim=SimpleNamespace(site_id="hostile"), signature=b"")
        problem = CkksAggregator(public_context=coordinator).check(update)
        print("REFUSED" if problem else "ACCEPTED", problem)
    else:  # a site summing certified updates (a coordinator relaying the hostile site's update)
        try:
            sum_encrypted(secret, [honest, [chunk]])
            print("ACCEPTED")
        except Exception as error:
            print("REFUSED", type(error).__name__)
    """
)


@pytest.mark.parametrize("loader", ["coordinator", "site"])
def test_a_truncated_zstd_ciphertext_is_refused_without_killing_the_process(
    loader: str,
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _ABORTING_CHUNK, loader],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"process died with {result.returncode}: {result.stderr[-300:]}"
    )
    assert result.stdout.startswith("REFUSED")


def test_a_site_that_packs_one_more_example_than_it_signs_is_caught(
    tmp_path: Path,
) -> None:
    # auto-chosen N = 1024, 24-bit prime; value-slot bound ~0.44, so the count's bound is ~0.11 < 0.5 and the
    # decrypted total is rounded to an integer, exactly — yet the tolerance used is 0.5 + 0.44
    params = choose_ckks_parameters(
        num_parameters=14,
        num_sites=2,
        max_abs_weight_bound=4.0,
        max_total_examples=1000,
        max_relative_error=1e-3,
    )
    secret = create_secret_context(params)
    codec = CkksSiteCodec(secret, kit_dir=tmp_path)
    assert codec.count_error_bound() < 0.5  # the count's own error, not a weight slot's (~0.44 here)
    rng = np.random.default_rng(0)
    honest = encrypt_update(secret, rng.uniform(-1, 1, 14), 300)
    lying = encrypt_update(
        secret, rng.uniform(-1, 1, 14), 301
    )  # signs 300 in its claim
    average, total = decrypt_average(secret, sum_encrypted(secret, [honest, lying]), 14)
    assert total == 601.0
    verified = VerifiedAggregate(
        server_round=1,
        aggregate_sha256="",
        participants=("a", "b"),
        claimed_examples=600,
    )
    with pytest.raises(AggregateRefused):
        check_decoded_sum(
            verified, average, total, error_bound=codec.count_error_bound()
        )


def test_an_average_past_the_weight_bound_is_refused(tmp_path: Path) -> None:
    """Every honest site encodes |w| <= B, so an encrypted sum averaging past B (+ its error) has wrapped
    modulo the prime: a key-holding participant packed values beyond the bound. Honest sites refuse it."""
    params = choose_ckks_parameters(num_parameters=14, num_sites=2, max_abs_weight_bound=4.0, max_total_examples=1000)
    secret = create_secret_context(params)
    codec = CkksSiteCodec(secret, kit_dir=tmp_path)
    honest = encrypt_update(secret, np.full(14, 3.9), 300)
    verified = VerifiedAggregate(server_round=1, aggregate_sha256="", participants=("a", "b"), claimed_examples=600)
    average, total = decrypt_average(secret, sum_encrypted(secret, [honest, honest]), 14)
    limit = codec.max_abs_average(total_examples=total)
    assert 4.0 <= limit < 4.01
    check_decoded_sum(verified, average, total, error_bound=codec.count_error_bound(), max_abs_average=limit)  # honest: accepted
    wrapped = average.copy()
    wrapped[3] = -4.2
    with pytest.raises(AggregateRefused, match="max_abs_weight_bound"):
        check_decoded_sum(verified, wrapped, total, error_bound=codec.count_error_bound(), max_abs_average=limit)
