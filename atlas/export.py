"""Exports: a Hive-partitioned Parquet tree any engine reads, and the HeadVis / Neuronpedia layout.

Parquet: one folder per table, partitioned by `model_key` with DuckDB's own
`COPY ... (FORMAT parquet, PARTITION_BY (model_key))`; the key is percent-encoded in the folder name
(`model_key=SmolLM2-135M-Instruct%40...`) and decoded by DuckDB, pyarrow, pandas and Spark.

HeadVis: `<out>/<model>/headvis/<dataset>/{config.json, scatter_data.json, heads/L{l}H{h}.json,
server_config.json, attributions/manifest.json}`, the tree Neuronpedia's headvis pipeline writes
and its frontend and loaders read (hijohnnylin/neuronpedia utils/neuronpedia-utils/.../headvis). A head
file's `sequences` are the head's `max_attention` examples in HeadVis's sparse format (atlas/examples.py);
its `examples` key holds every criterion's examples as stored.

DuoAttention (KV-cache compression, docs/kv-cache.md): `<out>/<model>/duoattention/` with
`full_attention_heads.tsv` (n_layers rows x n_kv_heads columns, 1 = keep the full KV cache, 0 = streaming:
sink + recent window) and `config.json` (`sink_size`, `recent_size`), the two files DuoAttention's
`load_attn_pattern` reads, plus `kv_heads.json`, the same labels with their scores for other methods
(RazorAttention, HeadKV): see KV_JSON_FORMAT.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from atlas.errors import BadInput
from atlas.examples import headvis_sequences, model_examples
from atlas.queries import resolve_model_key
from atlas.store import Atlas

# table -> SELECT over the atlas giving rows with a model_key column (None: global, not partitioned)
PARQUET_TABLES: dict[str, str | None] = {
    "models": "SELECT * FROM models",
    "runs": "SELECT * FROM runs",
    "heads": "SELECT * FROM heads",
    "head_metrics": "SELECT * FROM head_metrics",
    "head_tokens": "SELECT * FROM head_tokens",
    "concept_scores": "SELECT * FROM concept_scores",
    "edits": "SELECT * FROM edits",
    "run_metrics": "SELECT rm.*, r.model_key FROM run_metrics rm JOIN runs r USING (run_id)",
    "head_examples": "SELECT * FROM head_examples",
    "concepts": None,
    "role_thresholds": None,
}

# HeadVis scatter metric -> the atlas metric that measures it (None: not measured here)
HEADVIS_METRICS: dict[str, str | None] = {
    "self_attention_score": "patterns.self_attention",
    "prev_token_score": "patterns.prev_token",
    "pattern_entropy": "patterns.entropy",
    "qk_distance": "patterns.mean_distance",
    "qk_distance_variance": None,
    "induction_score": "patterns.induction",
}


def _model_keys(atlas: Atlas, models: list[str] | None) -> list[str]:
    if models:
        return [resolve_model_key(atlas, m) for m in models]
    return [r[0] for r in atlas.con.execute("SELECT model_key FROM models ORDER BY 1").fetchall()]


def _prepare(out: Path, names: list[str], overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out} exists and is not a folder", "pass --out with a folder path")
    clashes = [n for n in names if (out / n).exists()]
    if clashes and not overwrite:
        raise BadInput(f"{out} already holds an export ({', '.join(clashes)})",
                       "pass --overwrite to replace it, or another --out")
    for name in clashes:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def export_parquet(atlas: Atlas, out: str | Path, models: list[str] | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Write every atlas table as Parquet, partitioned by model_key; returns the manifest."""
    out = Path(out)
    keys = _model_keys(atlas, models)
    _prepare(out, [*PARQUET_TABLES, "manifest.json"], overwrite)
    marks = ", ".join("?" for _ in keys) or "NULL"
    tables: dict[str, Any] = {}
    for name, select in PARQUET_TABLES.items():
        target = out / name
        if select is None:
            rows = atlas.con.execute(f"SELECT count(*) FROM {name}").fetchall()[0][0]
            if rows:
                target.mkdir()
                atlas.con.execute(f"COPY (SELECT * FROM {name}) TO '{_sql_path(target / 'data_0.parquet')}' "
                                  f"(FORMAT parquet)")
            tables[name] = {"rows": rows, "partitioned_by": None}
            continue
        query = f"SELECT * FROM ({select}) WHERE model_key IN ({marks})"
        rows = atlas.con.execute(f"SELECT count(*) FROM ({query})", keys).fetchall()[0][0]
        if rows:
            # COPY cannot take parameters in its query: stage the rows in a temp view first.
            atlas.con.execute(f"CREATE OR REPLACE TEMP TABLE _export AS {query}", keys)
            atlas.con.execute(f"COPY _export TO '{_sql_path(target)}' "
                              f"(FORMAT parquet, PARTITION_BY (model_key))")
            atlas.con.execute("DROP TABLE _export")
        tables[name] = {"rows": rows, "partitioned_by": "model_key"}
    version = atlas.con.execute("SELECT value FROM atlas_meta WHERE key = 'schema_version'").fetchall()[0][0]
    manifest = {"format": "head-atlas parquet export", "schema_version": int(version), "atlas": str(atlas.path),
                "exported_at": datetime.now(UTC).isoformat(timespec="seconds"), "models": keys, "tables": tables,
                "read_with": {"duckdb": f"SELECT * FROM read_parquet('{out}/head_metrics/**/*.parquet', "
                                        "hive_partitioning = true)",
                              "pandas": f"pandas.read_parquet('{out}/head_metrics')",
                              "pyarrow": f"pyarrow.dataset.dataset('{out}/head_metrics', partitioning='hive')"}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def model_dir_name(model: dict[str, Any]) -> str:
    """A file-system-safe model id, like Neuronpedia's (`gemma-3-270m`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model["alias"] or model["model_key"]).strip("-")


def _wide_metrics(atlas: Atlas, key: str) -> dict[tuple[int, int], dict[str, dict[str, Any]]]:
    rows = atlas.execute("SELECT layer, head, metric, value, stderr, n, run_id FROM latest_metrics "
                         "WHERE model_key = ?", [key]).to_pylist()
    out: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["layer"], r["head"]), {})[r["metric"]] = {
            "value": _finite(r["value"]), "stderr": _finite(r["stderr"]), "n": r["n"], "run_id": r["run_id"]}
    return out


def _head_tokens(atlas: Atlas, key: str) -> dict[tuple[int, int], dict[str, list[dict[str, Any]]]]:
    rows = atlas.execute("""
        SELECT ht.layer, ht.head, ht.kind, ht.rank, ht.token_text, ht.token_id, ht.score
        FROM head_tokens ht JOIN runs r USING (run_id)
        WHERE r.status = 'complete' AND ht.model_key = ?
        QUALIFY dense_rank() OVER (PARTITION BY ht.kind ORDER BY r.finished_at DESC, ht.run_id) = 1
        ORDER BY ht.layer, ht.head, ht.kind, ht.rank""", [key]).to_pylist()
    out: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        out.setdefault((r["layer"], r["head"]), {}).setdefault(r["kind"], []).append(
            {"token": r["token_text"], "weight": _finite(r["score"]), "token_id": r["token_id"], "rank": r["rank"]})
    return out


def _concepts(atlas: Atlas, key: str) -> dict[tuple[int, int], list[dict[str, Any]]]:
    rows = atlas.execute("""
        SELECT cs.layer, cs.head, cs.concept, cs.score, cs.rank FROM concept_scores cs JOIN runs r USING (run_id)
        WHERE r.status = 'complete' AND cs.model_key = ?
        QUALIFY row_number() OVER (PARTITION BY cs.concept, cs.layer, cs.head ORDER BY r.finished_at DESC) = 1
        ORDER BY cs.layer, cs.head, cs.rank""", [key]).to_pylist()
    out: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["layer"], r["head"]), []).append(
            {"concept": r["concept"], "score": _finite(r["score"]), "rank": r["rank"]})
    return out


def _pipeline_config(atlas: Atlas, model: dict[str, Any], run_ids: list[str]) -> dict[str, Any]:
    runs = atlas.execute(
        f"SELECT run_id, family, family_version, probe_set, config, config_hash, code_version, device, tokens, "
        f"finished_at FROM runs WHERE run_id IN ({', '.join('?' for _ in run_ids) or 'NULL'}) ORDER BY run_id",
        run_ids).to_pylist()
    for r in runs:
        r["config"] = json.loads(r["config"]) if isinstance(r["config"], str) else r["config"]
        r["finished_at"] = r["finished_at"].isoformat() if r["finished_at"] else None
    patterns = next((r for r in runs if r["family"] == "patterns"), None)
    cfg = patterns["config"] if patterns else {}
    return {"model_key": model["model_key"], "source": model["source"], "format": model["format"],
            "quantization": model["quantization"], "num_hidden_layers": model["n_layers"],
            "num_attention_heads": model["n_heads"], "num_key_value_heads": model["n_kv_heads"],
            # the keys Neuronpedia's loader requires, read off the patterns run when there is one
            "n_sequences": cfg.get("batch", 0), "seq_len": 2 * cfg["n"] + 1 if "n" in cfg else 0,
            "dtype": cfg.get("dtype", model["dtype"]), "attn_implementation": cfg.get("attn_implementation", "unknown"),
            "metric_sources": {k: v for k, v in HEADVIS_METRICS.items()}, "runs": runs}


def _example_json(example: dict[str, Any]) -> dict[str, Any]:
    """A head_examples row for a head file: everything but the run (config.json's pipeline_config has it)."""
    return {k: v for k, v in example.items() if k not in ("run_id", "layer", "head", "criterion")}


def export_headvis(atlas: Atlas, out: str | Path, models: list[str] | None = None, dataset: str = "head-atlas",
                   overwrite: bool = False) -> dict[str, Any]:
    """Write one HeadVis tree per model; returns {model_key: tree folder}."""
    out = Path(out)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", dataset):
        raise BadInput(f"dataset name '{dataset}' must be letters, digits, '.', '_' or '-'",
                       "e.g. --dataset head-atlas")
    written: dict[str, str] = {}
    for key in _model_keys(atlas, models):
        model = atlas.execute("SELECT * FROM models WHERE model_key = ?", [key]).to_pylist()[0]
        np_id = model_dir_name(model)
        _prepare(out / np_id / "headvis", [dataset], overwrite)
        root = out / np_id / "headvis" / dataset
        (root / "heads").mkdir(parents=True)
        (root / "attributions").mkdir()
        written[key] = str(root)
        metrics, tokens, concepts = _wide_metrics(atlas, key), _head_tokens(atlas, key), _concepts(atlas, key)
        examples = model_examples(atlas, key)
        metric_ids = sorted({m for per in metrics.values() for m in per})
        kinds = sorted({k for per in tokens.values() for k in per})
        group = model["n_heads"] // max(model["n_kv_heads"], 1)
        scatter = []
        for layer in range(model["n_layers"]):
            for head in range(model["n_heads"]):
                mine = metrics.get((layer, head), {})
                row: dict[str, Any] = {"layer": layer, "head": head}
                for name, metric in HEADVIS_METRICS.items():
                    row[name] = mine[metric]["value"] if metric and metric in mine else None
                row.update({m: mine[m]["value"] if m in mine else None for m in metric_ids})
                row.update({"kv_head": head // group,
                            "depth": layer / (model["n_layers"] - 1) if model["n_layers"] > 1 else 0.0})
                scatter.append(row)
                mine_examples = examples.get((layer, head), {})
                sequences = headvis_sequences(mine_examples)
                peaks = [seq["max_activation"] for seq in sequences]
                head_json = {
                    "sequences": sequences, "qk_distance_histogram": {"bin_edges": [], "bin_values": []},
                    "top_query_tokens": [], "top_key_tokens": [], "histogram": {"bin_edges": [], "bin_values": []},
                    "statistics": {"n_samples": len(sequences),
                                   "mean_max_activation": sum(peaks) / len(peaks) if peaks else None},
                    "examples": {criterion: [_example_json(e) for e in rows]
                                 for criterion, rows in mine_examples.items()},
                    **{f"top_{kind}_tokens": tokens.get((layer, head), {}).get(kind, []) for kind in kinds},
                    "concepts": concepts.get((layer, head), []), "metrics": mine,
                    "layer": layer, "head": head, "kv_head": head // group, "depth": row["depth"]}
                _write_json(root / "heads" / f"L{layer}H{head}.json", head_json)
        _write_json(root / "scatter_data.json", scatter)
        run_ids = sorted({v["run_id"] for per in metrics.values() for v in per.values()}
                         | {e["run_id"] for per in examples.values() for rows in per.values() for e in rows})
        config = {
            "model_name": model["source"], "np_model_id": np_id, "dataset_name": dataset,
            "heads": [[r["layer"], r["head"]] for r in scatter], "n_layers": model["n_layers"],
            "n_heads": model["n_heads"], "n_intervals": 1 if examples else 0,  # examples: the top interval only
            "metrics": [m for m, src in HEADVIS_METRICS.items() if src in metric_ids] + metric_ids,
            "metric_descriptions": {m: f"head-atlas metric {src}" for m, src in HEADVIS_METRICS.items() if src}
            | {m: f"head-atlas metric {m}; see `atlas query` for its run" for m in metric_ids},
            "head_data_pattern": "L{layer}H{head}.json", "has_umap": False, "umap_heads": [], "custom_plots": [],
            "custom_tables": [{"key": f"top_{kind}_tokens", "label": f"Top {kind} tokens"} for kind in kinds],
            "statistics_display": {"n_samples": {"label": "Samples kept", "format": "default"}},
            "pipeline_config": _pipeline_config(atlas, model, run_ids)}
        _write_json(root / "config.json", config, indent=2)
        _write_json(root / "server_config.json", {})
        _write_json(root / "attributions" / "manifest.json", {})
    return written


# -- KV-cache compression labels --------------------------------------------------------------------------
KV_JSON_FORMAT = "head-atlas kv-heads v1"
KV_AGGREGATES = ("max", "mean")


def kv_head_labels(atlas: Atlas, model: str, budget: float, metric: str = "retrieval.score",
                   aggregate: str = "max") -> dict[str, Any]:
    """Per-KV-head full / streaming labels at `budget` (the share of KV heads, over all layers, that keep
    their full cache), ranked by `metric` aggregated over each KV head's query heads.

    Under GQA one KV head serves n_heads / n_kv_heads query heads and its cache is kept or cut for all of
    them: `max` (default) keeps it if any of its query heads retrieves; `mean` ranks by their average.
    Ties go to the lower (layer, kv_head). Returns the `kv_heads.json` document (KV_JSON_FORMAT)."""
    if not 0.0 <= budget <= 1.0 or math.isnan(budget):
        raise BadInput(f"budget {budget} is not a share of KV heads", "pass --budget between 0 and 1, e.g. 0.25")
    if aggregate not in KV_AGGREGATES:
        raise BadInput(f"unknown aggregate '{aggregate}'", f"use one of {', '.join(KV_AGGREGATES)}")
    key = resolve_model_key(atlas, model)
    info = atlas.execute("SELECT * FROM models WHERE model_key = ?", [key]).to_pylist()[0]
    rows = atlas.execute("SELECT layer, head, value, run_id FROM latest_metrics WHERE model_key = ? AND metric = ?",
                         [key, metric]).to_pylist()
    n_layers, n_heads, n_kv = info["n_layers"], info["n_heads"], max(info["n_kv_heads"], 1)
    if len(rows) < n_layers * n_heads:
        raise BadInput(f"{model} has {metric} for {len(rows)} of {n_layers * n_heads} heads",
                       f"build it first: atlas build --model {model} --families {metric.split('.')[0]}")
    group = n_heads // n_kv
    per_head = {(r["layer"], r["head"]): float(r["value"]) for r in rows}
    kv_heads: list[dict[str, Any]] = []
    for layer in range(n_layers):
        for kv in range(n_kv):
            served = [{"head": h, "score": per_head[(layer, h)]} for h in range(kv * group, (kv + 1) * group)]
            values = [q["score"] for q in served]
            score = max(values) if aggregate == "max" else sum(values) / len(values)
            kv_heads.append({"layer": layer, "kv_head": kv, "score": score, "query_heads": served})
    n_full = min(len(kv_heads), math.floor(budget * len(kv_heads) + 1e-9))  # a budget is a cap: round down
    order = sorted(range(len(kv_heads)), key=lambda i: (-kv_heads[i]["score"], i))
    chosen = set(order[:n_full])
    for i, entry in enumerate(kv_heads):
        entry["full"] = i in chosen
    return {"format": KV_JSON_FORMAT, "model_key": key, "source": info["source"], "metric": metric,
            "aggregate": aggregate, "budget": budget, "n_layers": n_layers, "n_heads": n_heads,
            "n_kv_heads": n_kv, "query_heads_per_kv_head": group, "full_kv_heads": n_full,
            "full_with_zero_score": sum(1 for i in chosen if kv_heads[i]["score"] <= 0.0),
            "runs": sorted({r["run_id"] for r in rows}), "kv_heads": kv_heads}


def export_duoattention(atlas: Atlas, out: str | Path, models: list[str] | None = None, budget: float = 0.25,
                        sink: int = 64, recent: int = 256, metric: str = "retrieval.score", aggregate: str = "max",
                        overwrite: bool = False) -> dict[str, str]:
    """Write DuoAttention's pattern folder (and kv_heads.json) per model; returns {model_key: folder}."""
    if sink < 0 or recent < 1:
        raise BadInput(f"sink {sink} / recent {recent} is not a streaming window",
                       "pass --sink >= 0 and --recent >= 1 (DuoAttention deploys 64 and 256)")
    out = Path(out)
    written: dict[str, str] = {}
    for key in _model_keys(atlas, models):
        labels = kv_head_labels(atlas, key, budget, metric, aggregate)
        model = atlas.execute("SELECT * FROM models WHERE model_key = ?", [key]).to_pylist()[0]
        parent = out / model_dir_name(model)
        _prepare(parent, ["duoattention"], overwrite)
        root = parent / "duoattention"
        root.mkdir()
        labels.update({"sink_size": sink, "recent_size": recent})
        grid = [[0] * labels["n_kv_heads"] for _ in range(labels["n_layers"])]
        for entry in labels["kv_heads"]:
            grid[entry["layer"]][entry["kv_head"]] = int(entry["full"])
        (root / "full_attention_heads.tsv").write_text("".join("\t".join(f"{v:.1f}" for v in row) + "\n"
                                                               for row in grid))
        _write_json(root / "config.json", {"sink_size": sink, "recent_size": recent, "sparsity": 1 - (
            labels["full_kv_heads"] / max(len(labels["kv_heads"]), 1)), "source": KV_JSON_FORMAT,
            "model_key": key, "metric": metric, "aggregate": aggregate, "budget": budget}, indent=1)
        _write_json(root / "kv_heads.json", labels, indent=1)
        written[key] = str(root)
    return written


def _finite(value: float | None) -> float | None:
    """JSON has no NaN; a missing number is null."""
    return value if value is None or math.isfinite(value) else None


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    path.write_text(json.dumps(obj, indent=indent, default=str, allow_nan=False) + "\n")
