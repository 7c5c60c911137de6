"""Peak memory of CSV ingestion ÷ file size (issue 10: ≤ 3×).

    python -m medtwin.experiments.bench_csv [--megabytes 200] [--out .medtwin/bench/csv.json]

Writes a synthetic hospital file (age, sex, systolic_bp, visits, smoker, readmitted) of the given size,
then validates it in a fresh process (`validate_site_csv`, what every site runs on its own file) and
reads that process's peak resident memory (VmHWM) before and after: ratio = growth ÷ file size.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from medtwin.core.rundir import atomic_write_text

HEADER = "age,sex,systolic_bp,visits,smoker,readmitted\n"

_CHILD = """
import json, sys, time
from pathlib import Path

def peak_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

from medtwin.core.config import CsvColumnConfig, CsvSchemaConfig
from medtwin.core.tasks import validate_site_csv

schema = CsvSchemaConfig(
    features=[
        CsvColumnConfig(name="age", type="float", min=0, max=120),
        CsvColumnConfig(name="sex", type="category", categories=["M", "F"]),
        CsvColumnConfig(name="systolic_bp", type="float"),
        CsvColumnConfig(name="visits", type="int"),
        CsvColumnConfig(name="smoker", type="bool"),
    ],
    target="readmitted",
)
before = peak_kib()
started = time.perf_counter()
table = validate_site_csv(sys.argv[1], schema)
print(json.dumps({"rows": int(table.num_rows), "before_kib": before, "after_kib": peak_kib(), "seconds": time.perf_counter() - started}))
"""


def write_file(path: Path, megabytes: float, *, seed: int = 0) -> int:
    rng = random.Random(seed)
    target = int(megabytes * 1024 * 1024)
    written = 0
    with path.open("w", encoding="utf-8") as handle:
        handle.write(HEADER)
        while written < target:
            lines = "".join(
                f"{rng.randint(18, 95)},{rng.choice('MF')},{rng.randint(90, 200)}.{rng.randint(0, 9)},{rng.randint(0, 30)},"
                f"{rng.choice(('true', 'false'))},{rng.randint(0, 1)}\n"
                for _ in range(10_000)
            )
            handle.write(lines)
            written += len(lines)
    return path.stat().st_size


def measure(path: Path) -> dict:
    completed = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True, check=True)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    size = path.stat().st_size
    growth = (result["after_kib"] - result["before_kib"]) * 1024
    return {**result, "file_bytes": size, "peak_growth_bytes": growth, "ratio": growth / size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=200.0)
    parser.add_argument("--workdir", type=Path, default=Path(".medtwin/bench-csv"))
    parser.add_argument("--out", type=Path, default=Path(".medtwin/bench/csv.json"))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / f"hospital-{args.megabytes:g}MB.csv"
    started = time.perf_counter()
    write_file(path, args.megabytes)
    result = measure(path) | {"write_seconds": time.perf_counter() - started}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(
        f"{result['file_bytes'] / 1e6:.0f} MB, {result['rows']:,} rows: peak memory grew {result['peak_growth_bytes'] / 1e6:.0f} MB "
        f"= {result['ratio']:.2f}x the file, in {result['seconds']:.0f} s  (written to {args.out})"
    )
    path.unlink()


if __name__ == "__main__":
    main()
