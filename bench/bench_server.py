"""Load test of `atlas serve` on loopback: head-card reads per second and p99 latency, idle, while
hostile requests run (oversized results, slow SQL, bad builds), and optionally while builds run and
ingest, measured side by side in one run (ratios, because these machines are noisy). Bounded: at
most --max-requests per phase and --max-seconds in all.

    .venv/bin/python bench/bench_server.py --db /tmp/bench.duckdb --model llama --builds 0 --hostile-seconds 30

The atlas at --db is built first (patterns family, local executor) if it does not exist; with
--builds N the server then rebuilds that model with seeds 1..N (new runs), so each build ingests a
full unit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.test_server_support import serve

BUDGET = threading.Lock()
HOSTILE_SQL = {
    "oversized": "SELECT repeat('x', 100000) AS s FROM range(2000)",  # 200 MB inside the row limit
    "slow": "SELECT count(*) FROM range(1000000000000) a",  # stopped at the time limit
}


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
            try:
                status = http.get(f"/api/heads/{key}/{layer}/{head}").status_code
            except httpx.HTTPError:
                status = -1
            log.append((t0, time.time(), status))


def hostile(url: str, kind: str, data: Path, stop: threading.Event, seen: Counter[str]) -> None:
    """One attacker: oversized results, slow SQL, or build requests naming files it must not read."""
    bad_builds = [{"corpus": "/dev/zero"}, {"corpus": "pipe.txt"}, {"corpus": "../../etc/passwd"},
                  {"concepts": ["/proc/self/environ"]}, {"models": ["/etc"]}]
    with httpx.Client(base_url=url, timeout=60) as http:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if kind in HOSTILE_SQL:
                    r = http.post("/api/sql", json={"sql": HOSTILE_SQL[kind]})
                else:
                    r = http.post("/api/builds", json={"models": ["llama"], "families": ["lens"],
                                                       **bad_builds[i % len(bad_builds)]})
                seen[f"{kind} {r.status_code}"] += 1
            except httpx.HTTPError as exc:
                seen[f"{kind} {type(exc).__name__}"] += 1


def rss_sampler(pid: int, stop: threading.Event, out: list[int]) -> None:
    """The server's resident memory (kB), every 0.2 s."""
    status = Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
            out.append(int(line.split()[1]))
        except (OSError, StopIteration):
            return
        time.sleep(0.2)


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


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    return round(a[key] / b[key], 2) if a.get(key) and b.get(key) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, default=Path("/tmp/bench_server.duckdb"))
    parser.add_argument("--model", default="llama")
    parser.add_argument("--builds", type=int, default=0)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--executor", default="local", choices=["local", "ray"])
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--hostile-seconds", type=float, default=20.0)
    parser.add_argument("--attackers", default="oversized,oversized,slow,slow,builds",
                        help="hostile threads during the hostile phase, by kind")
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()

    if not args.db.exists():
        from workers.build import build

        print(f"building {args.model} patterns into {args.db} first", file=sys.stderr)
        build([args.model], ["patterns"], args.db, device="cpu", executor="local")
    deadline = time.monotonic() + args.max_seconds
    load_before = os.getloadavg()
    data = Path(tempfile.mkdtemp(prefix="bench-data-"))
    os.mkfifo(data / "pipe.txt")
    with serve(args.db, "--executor", args.executor, "--sql-timeout", "2", "--data-dir", str(data)) as url, \
            httpx.Client(base_url=url, timeout=60) as http:
        rss: list[int] = []
        sampler_stop = threading.Event()
        threading.Thread(target=rss_sampler, args=(url.pid, sampler_stop, rss), daemon=True).start()
        models = http.get("/api/models").json()
        heads = [(m["model_key"], layer, head) for m in models for layer in range(m["n_layers"])
                 for head in range(m["n_heads"])]
        for key, layer, head in heads[:20]:  # warm up (first queries plan and cache)
            http.get(f"/api/heads/{key}/{layer}/{head}")
        idle_end = time.monotonic() + args.idle_seconds
        idle = phase(url, heads, args.readers, args.max_requests,
                     lambda: time.sleep(max(0.0, idle_end - time.monotonic())))
        rss_idle = max(rss) if rss else None

        seen: Counter[str] = Counter()
        stop = threading.Event()
        attackers = [threading.Thread(target=hostile, args=(url, kind, data, stop, seen))
                     for kind in args.attackers.split(",") if kind]
        for t in attackers:
            t.start()
        time.sleep(1.0)  # let the attack start before measuring
        hostile_end = time.monotonic() + args.hostile_seconds
        attacked = phase(url, heads, args.readers, args.max_requests,
                         lambda: time.sleep(max(0.0, min(hostile_end, deadline) - time.monotonic())))
        health = http.get("/api/health").status_code
        stop.set()
        for t in attackers:
            t.join()

        states: list[dict[str, Any]] = []
        busy: list[tuple[float, float, int]] = []
        if args.builds:
            ids = [http.post("/api/builds", json={"models": [args.model], "families": ["patterns"], "seed": seed})
                   .json()["id"] for seed in range(1, args.builds + 1)]

            def builds_done() -> None:
                while time.monotonic() < deadline:
                    if all(http.get(f"/api/builds/{i}").json()["status"] in ("complete", "failed") for i in ids):
                        return
                    time.sleep(0.5)

            busy = phase(url, heads, args.readers, args.max_requests, builds_done)
            states = [http.get(f"/api/builds/{i}").json() for i in ids]
        sampler_stop.set()
    result: dict[str, Any] = {
        "model": args.model, "executor": args.executor, "readers": args.readers,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "idle": summary(idle), "hostile": summary(attacked),
        "hostile_requests": dict(sorted(seen.items())), "health_during_attack": health,
        "server_rss_mb": {"idle_max": round(rss_idle / 1024) if rss_idle else None,
                          "max": round(max(rss) / 1024) if rss else None},
    }
    result["p99_ratio_hostile_vs_idle"] = ratio(result["hostile"], result["idle"], "p99_ms")
    result["rps_ratio_hostile_vs_idle"] = ratio(result["hostile"], result["idle"], "req_per_s")
    if states:
        windows = [w for s in states for w in s["ingest_windows"]]
        start = min(s["started_at"] or time.time() for s in states)
        end = max(s["finished_at"] or time.time() for s in states)
        during = [e for e in busy if start <= e[0] <= end]
        result["builds"] = [{"status": s["status"], "rows": (s["report"] or {}).get("rows"),
                             "seconds": round(s["finished_at"] - s["started_at"], 1) if s["finished_at"] else None}
                            for s in states]
        result["write_windows_ms"] = [round((b - a) * 1000, 1) for a, b in windows]
        result["during_build"], result["during_ingest"] = summary(during), summary(during, windows)
        result["p99_ratio_build_vs_idle"] = ratio(result["during_build"], result["idle"], "p99_ms")
        result["rps_ratio_build_vs_idle"] = ratio(result["during_build"], result["idle"], "req_per_s")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
