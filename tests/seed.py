"""Rows for test atlases, written the way workers write them: a `RunRecord`, a models row, tables
of rows through `write_shard`, then `Atlas.ingest`. No hand-built SQL, no hand-built runs dicts.

The `fresh_atlas` and `seeded_atlas` fixtures (tests/conftest.py) are built from these."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atlas.records import RunRecord
from atlas.shards import write_shard
from atlas.store import Atlas

T0 = "2026-01-01T00:00:00+00:00"


def model_row(key: str = "m@abc:safetensors", alias: str | None = "m", *, n_layers: int = 3, n_heads: int = 4,
              n_kv_heads: int = 2, d_model: int = 32, d_head: int = 8, vocab_size: int = 96,
              architecture: str = "LlamaForCausalLM") -> dict[str, Any]:
    """A models row for a made-up model (the shape of `LoadedModel.models_row()`)."""
    return {"model_key": key, "alias": alias, "source": alias or key, "format": "safetensors", "dtype": "float32",
            "architecture": architecture, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads,
            "d_model": d_model, "d_head": d_head, "vocab_size": vocab_size}


def run_record(run_id: str, model_key: str, family: str = "patterns", finished: str = T0,
               **fields: Any) -> RunRecord:
    """A complete run of a made-up family that started and ended at `finished`."""
    given = {"family_version": 1, "probe_set": "test", "config": {}, "config_hash": run_id, "code_version": "test",
             **fields}
    return RunRecord.ended(run_id=run_id, model_key=model_key, family=family, finished=finished, **given)


def head_rows(metric: str, model: dict[str, Any], value: Any = None, **columns: Any) -> list[dict[str, Any]]:
    """head_metrics rows for every head of `model`; `value(layer, head)` (default layer + head / 10)."""
    value = value or (lambda layer, head: layer + head / 10)
    return [{"layer": layer, "head": head, "metric": metric, "value": float(value(layer, head)), **columns}
            for layer in range(model["n_layers"]) for head in range(model["n_heads"])]


def ingest(db: Path, run: RunRecord, model: dict[str, Any], tables: dict[str, list[dict[str, Any]]],
           shard_root: Path | None = None) -> int:
    """Write one shard (rows need no run_id or model_key: they are the run's) and ingest it into `db`."""
    shard = write_shard(shard_root or db.with_name(db.stem + "_test_shards"), run, model, tables)
    with Atlas.writer(db) as atlas:
        return atlas.ingest(shard)


# What `seeded_atlas` holds: two models of different shape, one patterns run each.
ALPHA = model_row("alpha@1:safetensors", "alpha", n_layers=3, n_heads=4, n_kv_heads=2)
BETA = model_row("beta@1:safetensors", "beta", n_layers=2, n_heads=2, n_kv_heads=1)
METRICS = ("patterns.induction", "patterns.prev_token")


def seed(db: Path) -> Path:
    """Two models, a patterns run on each with every head's induction and previous-token score
    (induction: layer + head / 10; previous-token: its negative), n = 10, stderr 0.1."""
    for model in (ALPHA, BETA):
        run = run_record(f"patterns-{model['alias']}", model["model_key"], config={"n": 10})
        rows = [*head_rows(METRICS[0], model, n=10, stderr=0.1),
                *head_rows(METRICS[1], model, lambda layer, head: -(layer + head / 10), n=10, stderr=0.1)]
        ingest(db, run, model, {"head_metrics": rows})
    return db
