"""A multi-unit sweep on 2 Ray workers against 1, side by side in one run, and the driver's ingest rate.

The sweep is the patterns family over several probe seeds (one unit each) on one model. With one
worker the actor gets every CPU; with two, each gets half: on a machine with few cores the speed-up
measures what a second model copy buys beyond intra-op threading.

Usage: python bench/bench_sweep.py [--model llama] [--units 6]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from atlas.status import shard_root
from atlas.store import Atlas
from workers.build import build


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama")
    parser.add_argument("--units", type=int, default=6)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    seeds = list(range(args.units))
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        build([args.model], ["patterns"], Path(tmp) / "warm.duckdb", options={"seed": [999]})  # start Ray, cache
        for replicas in (1, 2):
            db = Path(tmp) / f"sweep{replicas}.duckdb"
            start = time.perf_counter()
            report = build([args.model], ["patterns"], db, options={"seed": seeds}, replicas=replicas)
            timings[replicas] = time.perf_counter() - start
            assert len(report.completed) == args.units, report.failed
        shards = sorted(p for p in shard_root(Path(tmp) / "sweep2.duckdb").iterdir() if p.is_dir())
        fresh = Path(tmp) / "ingest.duckdb"
        with Atlas.writer(fresh) as atlas:
            start = time.perf_counter()
            rows = sum(atlas.ingest(shard) for shard in shards)
            ingest_s = time.perf_counter() - start
    print(json.dumps({
        "model": args.model, "units": args.units, "cpus": os.cpu_count(),
        "one_worker_s": round(timings[1], 1), "two_workers_s": round(timings[2], 1),
        "speedup_two_over_one": round(timings[1] / timings[2], 2),
        "ingest_rows": rows, "ingest_s": round(ingest_s, 3), "ingest_rows_per_s": round(rows / ingest_s),
        "ingest_ms_per_unit": round(1000 * ingest_s / len(shards), 1),
    }, indent=1))


if __name__ == "__main__":
    main()
