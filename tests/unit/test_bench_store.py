"""bench/bench_store.py runs end to end on a tiny size: synthetic models through the real shard path,
every read operation timed, the figures it prints present and sane."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_store.py"


def test_bench_store_runs_on_a_tiny_atlas(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_store", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--sizes", "1,2", "--heads-scale", "0.05", "--runs", "2", "--reads", "3",
                          "--dir", str(tmp_path), "--json"])
    assert [r["models"] for r in results] == [1, 2]
    two = results[1]
    heads = two["heads"]
    metrics = sum(len(m) for m in bench.FAMILIES.values())
    # every family twice: the metrics, the lens tokens and the concept scores of every head
    per_head = 2 * (metrics + 2 * bench.TOKENS_PER_KIND + len(bench.CONCEPTS))
    assert two["rows_ingested"] == two["rows_stored"] == heads * per_head
    assert two["ingest_rows_per_s"] > 0 and two["bytes_per_row"] > 0
    assert set(two["reads"]) == set(bench.READS)
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in two["reads"].values())
    assert not list(tmp_path.glob("*.duckdb"))  # removed unless --keep
