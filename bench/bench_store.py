"""Synthetic atlases and the reads users run on them: how ingest and reads grow with the atlas.

Builds atlases of 1, 10 and 100 models (by default) with the shapes of open models up to 80 layers x
64 heads, every head with the metrics and concept scores the families produce (patterns, lens,
ablation, retrieval, pursuit: 20 metrics, lens token readouts, 10 concepts), each family run
`--runs` times so the history holds superseded runs and "latest" matters. Every unit is written as a
shard (atlas.shards.write_shard) and ingested by Atlas.ingest, the path builds take. Then, per size:

- ingest rows/s (the ingest alone, in the writer's transaction, not the shard writing) and file bytes
  per stored row;
- p50 / p99 of the reads users run: heads ranked by a metric across all models and in one model, a
  head card, a concept ranking, a `head_roles` filter, and a cross-model compare of two models (the
  `atlas compare` data, no HTML); with `--http`, the head card over HTTP from a real `atlas serve`.

    .venv/bin/python bench/bench_store.py --sizes 1,10 --heads-scale 0.25 --reads 30
    .venv/bin/python bench/bench_store.py --sizes 1,10,100 --http

`--heads-scale` multiplies every model's layer count (0.25: a quarter of the heads) where the
machine cannot hold the full sizes in its time; the report says what ran.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atlas.records import RunRecord
from atlas.shards import write_shard
from atlas.store import Atlas

# (name, layers, heads, kv heads): open models' attention shapes, cycled to make N models
SHAPES = [
    ("llama-3.1-70b", 80, 64, 8), ("llama-3.1-8b", 32, 32, 8), ("qwen2.5-32b", 64, 40, 8),
    ("gemma-2-27b", 46, 32, 16), ("mistral-7b", 32, 32, 8), ("qwen2.5-72b", 80, 64, 8),
    ("phi-3-mini", 32, 32, 32), ("qwen2.5-14b", 48, 40, 8), ("gemma-2-9b", 42, 16, 8),
    ("llama-3.2-3b", 28, 24, 8), ("qwen2.5-7b", 28, 28, 4), ("llama-3.2-1b", 16, 32, 8),
]
# family -> per-head metric ids (20 in all), as the families name them
FAMILIES = {
    "patterns": ["prev_token", "duplicate_token", "induction", "bos_sink", "self_attention", "entropy",
                 "mean_distance"],
    "lens": ["direct_effect", "direct_effect_centered"],
    "ablation": ["exact.loss", "exact.induction_loss", "exact.ioi_logit_diff", "atp.loss", "atp.induction_loss",
                 "atp.ioi_logit_diff"],
    "retrieval": ["score", "needle_score", "activation_frequency"],
    "pursuit": ["evr", "evr_control"],
}
CONCEPTS = ["colors", "months", "numbers", "countries", "animals", "emotions", "food", "sports", "body",
            "weather"]
TOKENS_PER_KIND = 10  # lens: top tokens stored per head and kind (promote, suppress)
READS = ("rank_all", "rank_model", "head_card", "concept", "head_roles_filter", "compare")


def shapes(n_models: int, heads_scale: float) -> list[dict[str, Any]]:
    out = []
    for i in range(n_models):
        name, layers, heads, kv = SHAPES[i % len(SHAPES)]
        layers = max(2, round(layers * heads_scale))
        out.append({"model_key": f"{name}-{i:03d}@bench:safetensors", "alias": f"{name}-{i:03d}",
                    "source": name, "format": "safetensors", "dtype": "bfloat16",
                    "architecture": "LlamaForCausalLM", "n_layers": layers, "n_heads": heads, "n_kv_heads": kv,
                    "d_model": heads * 128, "d_head": 128, "vocab_size": 128256})
    return out


def unit_tables(family: str, model: dict[str, Any], rng: np.random.Generator) -> dict[str, pa.Table]:
    """One family's rows for every head of a model, as Arrow (the shard path checks them column-wise)."""
    n_layers, n_heads = model["n_layers"], model["n_heads"]
    layer = np.repeat(np.arange(n_layers, dtype=np.int32), n_heads)
    head = np.tile(np.arange(n_heads, dtype=np.int32), n_layers)
    heads = len(layer)
    metrics = [f"{family}.{m}" for m in FAMILIES[family]]
    tables = {"head_metrics": pa.table({
        "layer": np.tile(layer, len(metrics)), "head": np.tile(head, len(metrics)),
        "metric": pa.array(np.repeat(metrics, heads)),
        "value": rng.random(heads * len(metrics)), "n": np.full(heads * len(metrics), 64, dtype=np.int64),
        "stderr": rng.random(heads * len(metrics)) / 100})}
    if family == "lens":
        kinds = ["promote", "suppress"]
        reps = len(kinds) * TOKENS_PER_KIND
        token_ids = rng.integers(0, model["vocab_size"], heads * reps)
        tables["head_tokens"] = pa.table({
            "layer": np.repeat(layer, reps), "head": np.repeat(head, reps),
            "kind": pa.array(np.tile(np.repeat(kinds, TOKENS_PER_KIND), heads)),
            "rank": np.tile(np.arange(1, TOKENS_PER_KIND + 1, dtype=np.int32), heads * len(kinds)),
            "token_id": token_ids, "token_text": pa.array([f" tok{t}" for t in token_ids]),
            "score": rng.random(heads * reps)})
    if family == "pursuit":
        scores = rng.random((len(CONCEPTS), heads))
        ranks = (np.argsort(np.argsort(-scores, axis=1), axis=1) + 1).astype(np.int32)
        tables["concept_scores"] = pa.table({
            "layer": np.tile(layer, len(CONCEPTS)), "head": np.tile(head, len(CONCEPTS)),
            "concept": pa.array(np.repeat(CONCEPTS, heads)), "score": scores.ravel(), "rank": ranks.ravel()})
    return tables


def build(db: Path, models: list[dict[str, Any]], runs: int, seed: int = 0) -> dict[str, float]:
    """Every family `runs` times for every model, unit by unit: shard, then ingest (timed)."""
    rng = np.random.default_rng(seed)
    shard_root = db.with_name(db.stem + "_shards")
    rows = 0
    ingest_s = 0.0
    units = 0
    with Atlas.writer(db) as atlas:
        for model in models:
            for family in FAMILIES:
                for r in range(runs):
                    finished = f"2026-0{1 + r % 9}-01T00:00:00+00:00"
                    run = RunRecord.ended(run_id=f"{family}-{model['alias']}-{r}", model_key=model["model_key"],
                                          family=family, finished=finished, family_version=1, probe_set="bench",
                                          config={"run": r}, config_hash=f"{r}", code_version="bench")
                    shard = write_shard(shard_root, run, model, unit_tables(family, model, rng))
                    start = time.perf_counter()
                    rows += atlas.ingest(shard)
                    ingest_s += time.perf_counter() - start
                    units += 1
                    shutil.rmtree(shard)
    return {"units": units, "rows": rows, "ingest_s": ingest_s}


def timed(fn: Callable[[], Any], reads: int) -> dict[str, float]:
    fn()  # warm: the first call pays for opening row groups
    times = []
    for _ in range(reads):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2),
            "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 2)}


def read_ops(atlas: Atlas, models: list[dict[str, Any]], rng: random.Random) -> dict[str, Callable[[], Any]]:
    from atlas import queries, report
    from atlas.pages import data

    metrics = [f"{f}.{m}" for f, ms in FAMILIES.items() for m in ms]

    def card() -> Any:
        model = rng.choice(models)
        return data.head_card(atlas, model["alias"], rng.randrange(model["n_layers"]),
                              rng.randrange(model["n_heads"]))

    def roles_filter() -> Any:  # a user's wide-view question: strong induction heads with weak prev-token
        return atlas.query('SELECT alias, layer, head, kv_head, depth, "patterns.induction" FROM head_roles '
                           'WHERE "patterns.induction" > 0.99 AND "patterns.prev_token" < 0.5 ORDER BY depth')

    two = [m["alias"] for m in models[:2]] if len(models) > 1 else [models[0]["alias"]]
    return {
        "rank_all": lambda: queries.rank_heads(atlas, rng.choice(metrics), None, 10),
        "rank_model": lambda: queries.rank_heads(atlas, rng.choice(metrics), rng.choice(models)["alias"], 10),
        "head_card": card,
        "concept": lambda: data.concept_heads(atlas, rng.choice(CONCEPTS), None, 10),
        "head_roles_filter": roles_filter,
        "compare": lambda: report.compare(atlas, two, ["patterns.induction", "patterns.prev_token"], None, None, 5),
    }


def http_card(db: Path, models: list[dict[str, Any]], reads: int, rng: random.Random) -> dict[str, float]:
    """Head cards over HTTP from a real `atlas serve` (warm: one request first), one client."""
    import httpx

    from tests.integration.test_server_support import serve

    with serve(db) as url, httpx.Client(base_url=url, timeout=30) as client:
        def get() -> None:
            model = rng.choice(models)
            response = client.get(f"/api/heads/{model['alias']}/{rng.randrange(model['n_layers'])}/"
                                  f"{rng.randrange(model['n_heads'])}")
            response.raise_for_status()

        return timed(get, reads)


def run_size(n_models: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    models = shapes(n_models, args.heads_scale)
    db = root / f"atlas-{n_models}.duckdb"
    built = build(db, models, args.runs)
    with Atlas.writer(db) as atlas:  # a checkpoint, so the file size is what stays on disk
        atlas.con.execute("CHECKPOINT")
        stored = atlas.con.execute("SELECT (SELECT count(*) FROM head_metrics) + (SELECT count(*) FROM head_tokens) "
                                   "+ (SELECT count(*) FROM concept_scores)").fetchone()
    stored_rows = int(stored[0]) if stored else 0
    result: dict[str, Any] = {
        "models": n_models, "heads": sum(m["n_layers"] * m["n_heads"] for m in models),
        "units": built["units"], "rows_ingested": built["rows"], "rows_stored": stored_rows,
        "ingest_rows_per_s": round(built["rows"] / built["ingest_s"]), "ingest_s": round(built["ingest_s"], 1),
        "file_mb": round(db.stat().st_size / 2**20, 1),
        "bytes_per_row": round(db.stat().st_size / max(stored_rows, 1), 1), "reads": {}}
    rng = random.Random(0)
    with Atlas(db) as atlas:
        for name, fn in read_ops(atlas, models, rng).items():
            if name in args.skip:
                continue
            result["reads"][name] = timed(fn, args.compare_reads if name == "compare" else args.reads)
    if args.http:
        result["reads"]["head_card_http"] = http_card(db, models, args.reads, rng)
    if not args.keep:
        db.unlink()
    return result


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,10,100", help="Model counts, comma-separated.")
    parser.add_argument("--heads-scale", type=float, default=1.0, help="Multiplies every model's layers.")
    parser.add_argument("--runs", type=int, default=2, help="Runs of every family per model (history).")
    parser.add_argument("--reads", type=int, default=50, help="Timed calls per read operation.")
    parser.add_argument("--compare-reads", type=int, default=5, help="Timed calls of the compare (seconds each).")
    parser.add_argument("--http", action="store_true", help="Also time head cards from a real atlas serve.")
    parser.add_argument("--skip", default="", help=f"Read operations to leave out: {', '.join(READS)}.")
    parser.add_argument("--dir", type=Path, default=None, help="Where the atlases go (default: a temp dir).")
    parser.add_argument("--keep", action="store_true", help="Keep the atlas files.")
    parser.add_argument("--json", action="store_true", help="One JSON document instead of the table.")
    args = parser.parse_args(argv)
    args.skip = {s for s in args.skip.split(",") if s}
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-store-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        result = run_size(size, args, root)
        results.append(result)
        if not args.json:
            print(_line(result), flush=True)
    if args.json:
        print(json.dumps({"heads_scale": args.heads_scale, "runs": args.runs, "reads": args.reads,
                          "sizes": results}, indent=1))
    if args.dir is None and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return results


def _line(r: dict[str, Any]) -> str:
    reads = "  ".join(f"{k} {v['p50_ms']}/{v['p99_ms']}" for k, v in r["reads"].items())
    return (f"{r['models']} models, {r['heads']} heads, {r['rows_stored']} rows, {r['file_mb']} MB "
            f"({r['bytes_per_row']} B/row); ingest {r['ingest_rows_per_s']} rows/s; "
            f"reads p50/p99 ms: {reads}")


if __name__ == "__main__":
    main()
