"""Benchmark: the bytes of a site's plain (crypto=plain) update as Flower ships them, per model.

    python -m medtwin.experiments.bench_wire [--out .medtwin/bench/wire.json]

For every shipped task's model and a 99,073-parameter MLP (64-512-128-1, bench_he_round's model) a
site's update is packed as a site packs it (`PlainSiteCodec.pack`) and its reply built as
client/app.py builds it (UPDATE, the signed SITE claim, METRICS). Three counts, each ÷ (4 bytes ×
parameters), so 1.00 is raw float32:

  payload  the update array's data bytes (what a run summary's bytes_per_parameter counts)
  record   the UPDATE ArrayRecord as Flower pushes it: every object of its tree (ArrayRecord, Array,
           ArrayChunk), each its deflated content and its 64-character object id
  reply    the whole content of the reply (RecordDict), counted the same way; the Message's metadata
           and gRPC/TLS framing are not counted

Side by side, the same counts for the float64 [n*w..., n] np.save payload earlier versions sent,
and the aggregate a site receives (float64 Σ n_i·w_i with its count; the round's instruction also
carries the certified float32 updates, one per participant, which every site sums itself).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects
from torch import nn

from medtwin.client.codec import PlainSiteCodec
from medtwin.core.config import compose_config
from medtwin.core.identity import ReplyClaim, sign_claim
from medtwin.core.model_vector import model_to_vector
from medtwin.core.plain_payload import PLAIN_PAYLOAD, sum_plain_updates
from medtwin.core.protocol import METRICS, SITE, UPDATE, payload_sha256, site_reply_record
from medtwin.core.rundir import atomic_write_text
from medtwin.core.tasks import get_task

SHIPPED_TASKS = ("fed_heart_disease", "breast_cancer", "diabetes_progression", "csv_example", "vitals")
MLP_LAYERS = (64, 512, 128, 1)
NUM_EXAMPLES = 1_000


@dataclass(frozen=True)
class WireRow:
    model: str
    parameters: int
    payload_ratio: float  # update array data bytes / (4 x parameters)
    record_ratio: float  # the UPDATE ArrayRecord's Flower objects / (4 x parameters)
    reply_ratio: float  # the whole reply RecordDict's Flower objects / (4 x parameters)
    float64_payload_ratio: float  # the same three for earlier versions' float64 np.save payload
    float64_record_ratio: float
    float64_reply_ratio: float
    aggregate_record_ratio: float  # the float64 sum a site receives, Flower objects / (4 x parameters)


def flower_bytes(item: InflatableObject) -> int:
    """What Flower pushes for an object tree: each distinct object's deflated content and its object id."""
    return sum(len(object_id) + len(part.deflate()) for object_id, part in get_all_nested_objects(item).items())


def signed_reply(update: ArrayRecord, *, num_examples: int, signing_key: Ed25519PrivateKey) -> RecordDict:
    """A train reply as client/app.py builds it (claim fields of a DP run: ε, δ, dataset manifest)."""
    claim = ReplyClaim(
        kind="update", run_id="20260101-000000-bench", server_round=1, site_id="hospital-a",
        payload_sha256=payload_sha256(update), num_examples=num_examples, epsilon=0.731, delta=1e-5,
        dataset_manifest="ab" * 32, status="trained",
    )  # fmt: skip
    return RecordDict(
        {
            UPDATE: update,
            SITE: site_reply_record(claim, sign_claim(signing_key, claim)),
            METRICS: MetricRecord({"train_loss": 0.4321}),
        }
    )


def measure(model: str, weights: np.ndarray, *, signing_key: Ed25519PrivateKey) -> WireRow:
    parameters = int(weights.size)
    float32_bytes = 4 * parameters
    update = PlainSiteCodec().pack(weights, num_examples=NUM_EXAMPLES, run_id="bench")
    legacy = ArrayRecord({PLAIN_PAYLOAD: Array(np.append(weights * NUM_EXAMPLES, float(NUM_EXAMPLES)))})

    def ratios(record: ArrayRecord) -> tuple[float, float, float]:
        payload = sum(len(array.data) for array in record.values())
        reply = signed_reply(record, num_examples=NUM_EXAMPLES, signing_key=signing_key)
        return payload / float32_bytes, flower_bytes(record) / float32_bytes, flower_bytes(reply) / float32_bytes

    payload, record, reply = ratios(update)
    old_payload, old_record, old_reply = ratios(legacy)
    aggregate = sum_plain_updates([update, update])
    return WireRow(
        model=model, parameters=parameters, payload_ratio=payload, record_ratio=record, reply_ratio=reply,
        float64_payload_ratio=old_payload, float64_record_ratio=old_record, float64_reply_ratio=old_reply,
        aggregate_record_ratio=flower_bytes(aggregate) / float32_bytes,
    )  # fmt: skip


def shipped_models() -> dict[str, np.ndarray]:
    """Each shipped task's initial model and the 100k MLP, as flat weight vectors (seeded)."""
    models = {}
    for name in SHIPPED_TASKS:
        torch.manual_seed(0)
        models[name] = model_to_vector(get_task(compose_config([f"task={name}"]).task).build_model())
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for width, size in zip(MLP_LAYERS, MLP_LAYERS[1:]):
        layers += [nn.Linear(width, size), nn.ReLU()]
    models[f"MLP {'-'.join(map(str, MLP_LAYERS))}"] = model_to_vector(nn.Sequential(*layers[:-1]))
    return models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".medtwin/bench/wire.json"))
    args = parser.parse_args(argv)
    signing_key = Ed25519PrivateKey.generate()
    rows = [measure(name, weights, signing_key=signing_key) for name, weights in shipped_models().items()]
    header = (
        f"{'model':<22} {'parameters':>10} {'payload':>8} {'record':>8} {'reply':>8}   "
        f"{'f64 payload':>11} {'f64 record':>10} {'f64 reply':>9}   {'aggregate':>9}"
    )
    print("plain uplink, bytes ÷ (4 x parameters): float32 update (now) vs float64 [n*w..., n] (before)")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.model:<22} {row.parameters:>10,} {row.payload_ratio:>8.3f} {row.record_ratio:>8.3f} {row.reply_ratio:>8.3f}   "
            f"{row.float64_payload_ratio:>11.3f} {row.float64_record_ratio:>10.3f} {row.float64_reply_ratio:>9.3f}   "
            f"{row.aggregate_record_ratio:>9.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"rows": [asdict(row) for row in rows]}, indent=1) + "\n")
    print(f"(written to {args.out})")


if __name__ == "__main__":
    main()
