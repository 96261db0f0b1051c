"""Load test of `atlas serve` on loopback: head-card reads per second and p99 latency, idle and
while builds are running and ingesting, measured side by side in one run (ratios, because these
machines are noisy). Bounded: at most --max-requests per phase and --max-seconds in all.

    .venv/bin/python bench/bench_server.py --db /tmp/bench.duckdb --model llama --builds 2

The atlas at --db is built first (patterns family, local executor) if it does not exist; the
server then rebuilds that model with seeds 1..builds (new runs), so each build ingests a full unit.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.test_server_support import serve

BUDGET = threading.Lock()


def hammer(url: str, heads: list[tuple[str, int, int]], stop: threading.Event, budget: list[int],
           log: list[tuple[float, float, int]], seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            with BUDGET:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            key, layer, head = rng.choice(heads)
            t0 = time.time()
            status = http.get(f"/api/heads/{key}/{layer}/{head}").status_code
            log.append((t0, time.time(), status))


def phase(url: str, heads: list[tuple[str, int, int]], readers: int, max_requests: int,
          until: Any) -> list[tuple[float, float, int]]:
    stop, budget, log = threading.Event(), [max_requests], []
    threads = [threading.Thread(target=hammer, args=(url, heads, stop, budget, log, i)) for i in range(readers)]
    for t in threads:
        t.start()
    until()
    stop.set()
    for t in threads:
        t.join()
    return log


def summary(log: list[tuple[float, float, int]], windows: list[list[float]] | None = None) -> dict[str, Any]:
    if windows is not None:  # requests in flight during an ingest transaction
        log = [e for e in log if any(e[0] <= end and e[1] >= start for start, end in windows)]
    if not log:
        return {"requests": 0}
    lat = sorted((end - start) * 1000 for start, end, _ in log)
    span = max(e[1] for e in log) - min(e[0] for e in log)
    return {"requests": len(log), "errors": sum(1 for e in log if e[2] != 200),
            "req_per_s": round(len(log) / span, 1) if span > 0 else None,
            "p50_ms": round(statistics.median(lat), 1),
            "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
            "max_ms": round(lat[-1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("/tmp/bench_server.duckdb"))
    parser.add_argument("--model", default="llama")
    parser.add_argument("--builds", type=int, default=1)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--executor", default="local", choices=["local", "ray"])
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()

    if not args.db.exists():
        from workers.build import build

        print(f"building {args.model} patterns into {args.db} first", file=sys.stderr)
        build([args.model], ["patterns"], args.db, device="cpu", executor="local")
    deadline = time.monotonic() + args.max_seconds
    with serve(args.db, "--executor", args.executor) as url, httpx.Client(base_url=url, timeout=60) as http:
        models = http.get("/api/models").json()
        heads = [(m["model_key"], layer, head) for m in models for layer in range(m["n_layers"])
                 for head in range(m["n_heads"])]
        for key, layer, head in heads[:20]:  # warm up (first queries plan and cache)
            http.get(f"/api/heads/{key}/{layer}/{head}")
        idle_end = time.monotonic() + args.idle_seconds
        idle = phase(url, heads, args.readers, args.max_requests,
                     lambda: time.sleep(max(0.0, idle_end - time.monotonic())))

        ids = [http.post("/api/builds", json={"models": [args.model], "families": ["patterns"], "seed": seed})
               .json()["id"] for seed in range(1, args.builds + 1)]

        def builds_done() -> None:
            while time.monotonic() < deadline:
                if all(http.get(f"/api/builds/{i}").json()["status"] in ("complete", "failed") for i in ids):
                    return
                time.sleep(0.5)

        busy = phase(url, heads, args.readers, args.max_requests, builds_done)
        states = [http.get(f"/api/builds/{i}").json() for i in ids]
    windows = [w for s in states for w in s["ingest_windows"]]
    start = min(s["started_at"] or time.time() for s in states)
    end = max(s["finished_at"] or time.time() for s in states)
    during = [e for e in busy if start <= e[0] <= end]
    result = {
        "model": args.model, "executor": args.executor, "readers": args.readers,
        "builds": [{"status": s["status"], "rows": (s["report"] or {}).get("rows"),
                    "seconds": round(s["finished_at"] - s["started_at"], 1) if s["finished_at"] else None}
                   for s in states],
        "write_windows_ms": [round((b - a) * 1000, 1) for a, b in windows],  # resume check + one per unit
        "idle": summary(idle), "during_build": summary(during), "during_ingest": summary(during, windows),
    }
    if result["idle"].get("p99_ms") and result["during_build"].get("p99_ms"):
        result["p99_ratio_build_vs_idle"] = round(result["during_build"]["p99_ms"] / result["idle"]["p99_ms"], 2)
        result["rps_ratio_build_vs_idle"] = round(result["during_build"]["req_per_s"] / result["idle"]["req_per_s"], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
