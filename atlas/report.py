"""Cross-model comparison: gather what an atlas says about several models, then render it.

`compare()` returns a plain JSON-able dict (models, per-metric layer x head grids, role counts at
configurable thresholds, per-concept top heads, and the runs every number came from);
`render_html()` turns it into one self-contained page (plotly.js inlined once, no network).
Depth is normalized as layer / (n_layers - 1) so a 30-layer and an 18-layer model share an axis;
GQA is shown as the query head's kv_head = head // (n_heads / n_kv_heads).
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from atlas.circuits import circuit_predictions
from atlas.consistency import consistency
from atlas.errors import BadInput, NotFound
from atlas.queries import resolve_metric, resolve_model_key
from atlas.store import Atlas

TOP_K = 5
DRAWS = 2000
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]


def _placeholders(values: list[Any]) -> str:
    return ", ".join("?" for _ in values)


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def model_infos(atlas: Atlas, specs: list[str] | None) -> list[dict[str, Any]]:
    """The models to compare, in the order given (all models in the atlas when none are)."""
    if specs:
        keys = [resolve_model_key(atlas, spec) for spec in specs]
    else:
        keys = [r[0] for r in atlas.con.execute("SELECT model_key FROM models ORDER BY model_key").fetchall()]
    if not keys:
        raise NotFound(f"no models in {atlas.path}", "build one first: atlas build --model llama")
    if len(set(keys)) != len(keys):
        raise BadInput("the same model was named twice", "name each model once")
    rows = atlas.execute(f"SELECT * FROM models WHERE model_key IN ({_placeholders(keys)})", keys).to_pylist()
    by_key = {r["model_key"]: r for r in rows}
    infos = []
    for key in keys:
        row = by_key[key]
        infos.append({
            "label": row["alias"] or key, "model_key": key, "alias": row["alias"],
            "architecture": row["architecture"], "n_layers": row["n_layers"], "n_heads": row["n_heads"],
            "n_kv_heads": row["n_kv_heads"], "group": row["n_heads"] // max(row["n_kv_heads"], 1),
            "d_model": row["d_model"], "d_head": row["d_head"], "vocab_size": row["vocab_size"],
            "format": row["format"], "quantization": row["quantization"], "dtype": row["dtype"],
            "source": row["source"],
        })
    return infos


def parse_thresholds(items: list[str] | None) -> dict[str, float]:
    """`metric=value` pairs from the command line."""
    out: dict[str, float] = {}
    for item in items or []:
        metric, sep, value = item.partition("=")
        try:
            out[metric.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not metric.strip():
            raise BadInput(f"threshold '{item}' is not METRIC=VALUE", "e.g. --threshold patterns.induction=0.3")
    return out


def _grids(atlas: Atlas, infos: list[dict[str, Any]], metrics: list[str]) -> dict[str, dict[str, Any]]:
    """{model_key: {metric: {values, stderr, n, run_ids}}}, values as n_layers x n_heads lists."""
    keys = [m["model_key"] for m in infos]
    rows = atlas.execute(
        f"SELECT model_key, metric, layer, head, value, stderr, n, run_id FROM latest_metrics "
        f"WHERE model_key IN ({_placeholders(keys)}) AND metric IN ({_placeholders(metrics)})",
        keys + metrics).to_pylist()
    shape = {m["model_key"]: (m["n_layers"], m["n_heads"]) for m in infos}
    grids: dict[str, dict[str, Any]] = {k: {} for k in keys}
    for row in rows:
        cell = grids[row["model_key"]].get(row["metric"])
        if cell is None:
            n_layers, n_heads = shape[row["model_key"]]
            cell = {"values": np.full((n_layers, n_heads), np.nan), "stderr": np.full((n_layers, n_heads), np.nan),
                    "n": row["n"], "run_ids": set()}
            grids[row["model_key"]][row["metric"]] = cell
        cell["values"][row["layer"], row["head"]] = row["value"]
        if row["stderr"] is not None:
            cell["stderr"][row["layer"], row["head"]] = row["stderr"]
        cell["run_ids"].add(row["run_id"])
    for per_model in grids.values():
        for cell in per_model.values():
            cell["values"] = [[_finite(v) for v in r] for r in cell["values"].tolist()]
            cell["stderr"] = [[_finite(v) for v in r] for r in cell["stderr"].tolist()]
            cell["run_ids"] = sorted(cell["run_ids"])
    return grids


def _head_row(info: dict[str, Any], layer: int, head: int) -> dict[str, Any]:
    depth = layer / (info["n_layers"] - 1) if info["n_layers"] > 1 else 0.0
    return {"layer": layer, "head": head, "kv_head": head // info["group"], "depth": depth}


def _top_heads(info: dict[str, Any], values: list[list[float | None]], k: int) -> list[dict[str, Any]]:
    cells = [(v, layer, head) for layer, row in enumerate(values) for head, v in enumerate(row) if v is not None]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [{**_head_row(info, layer, head), "value": v, "rank": i + 1}
            for i, (v, layer, head) in enumerate(cells[:k])]


def _roles(atlas: Atlas, infos: list[dict[str, Any]], metrics: list[str],
           grids: dict[str, dict[str, Any]], overrides: dict[str, float]) -> list[dict[str, Any]]:
    defaults = {r["metric"]: r for r in atlas.execute("SELECT * FROM role_thresholds").to_pylist()}
    roles = []
    for metric in metrics:
        default = defaults.get(metric)
        if default is None and metric not in overrides:
            continue
        threshold = overrides.get(metric, default["threshold"] if default else None)
        role: dict[str, Any] = {
            "metric": metric, "label": default["label"] if default else metric.split(".", 1)[-1],
            "threshold": threshold, "default_threshold": default["threshold"] if default else None,
            "source": default["source"] if default else "set on the command line",
            "overridden": metric in overrides, "counts": {}}
        for info in infos:
            cell = grids[info["model_key"]].get(metric)
            if cell is None:
                continue
            heads = [[layer, head] for layer, row in enumerate(cell["values"])
                     for head, v in enumerate(row) if v is not None and v > threshold]
            total = sum(v is not None for row in cell["values"] for v in row)
            per_layer = [sum(1 for v in row if v is not None and v > threshold) / max(len(row), 1)
                         for row in cell["values"]]
            role["counts"][info["model_key"]] = {"count": len(heads), "total": total,
                                                 "fraction": len(heads) / total if total else None,
                                                 "heads": heads, "per_layer": per_layer}
        roles.append(role)
    return roles


def _concepts(atlas: Atlas, infos: list[dict[str, Any]], wanted: list[str] | None, k: int) -> list[dict[str, Any]]:
    keys = [m["model_key"] for m in infos]
    rows = atlas.execute(f"""
        SELECT cs.model_key, cs.concept, cs.layer, cs.head, cs.score, cs.rank, cs.run_id
        FROM concept_scores cs JOIN runs r USING (run_id)
        WHERE r.status = 'complete' AND cs.model_key IN ({_placeholders(keys)})
        QUALIFY row_number() OVER (PARTITION BY cs.model_key, cs.concept, cs.layer, cs.head
                                   ORDER BY r.finished_at DESC) = 1""", keys).to_pylist()
    present = sorted({r["concept"] for r in rows})
    if wanted:
        missing = [c for c in wanted if c not in present]
        if missing:
            raise NotFound(f"no concept scores for {', '.join(missing)} in {atlas.path}",
                           f"concepts with scores: {', '.join(present) or 'none - build the pursuit family'}")
        present = list(wanted)
    words = {r["name"]: r["words"] for r in atlas.execute("SELECT name, words FROM concepts").to_pylist()}
    by_key = {m["model_key"]: m for m in infos}
    out = []
    for concept in present:
        entry: dict[str, Any] = {"concept": concept, "words": _json_list(words.get(concept)), "models": {}}
        for key in keys:
            mine = [r for r in rows if r["concept"] == concept and r["model_key"] == key]
            if not mine:
                continue
            mine.sort(key=lambda r: (r["rank"], -r["score"]))
            info = by_key[key]
            entry["models"][key] = {
                "run_ids": sorted({r["run_id"] for r in mine}),
                "top": [{**_head_row(info, r["layer"], r["head"]), "value": r["score"], "rank": r["rank"]}
                        for r in mine[:k]],
                "points": [[_head_row(info, r["layer"], r["head"])["depth"], r["score"], r["layer"], r["head"]]
                           for r in mine]}
        out.append(entry)
    return out


def _circuits(atlas: Atlas, infos: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per model with a circuits run: do its weight-only scores predict the measured roles?"""
    out = {}
    for info in infos:
        try:
            out[info["model_key"]] = circuit_predictions(atlas, info["model_key"])
        except NotFound:  # no circuits family built for this model
            continue
    return out


def _json_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return [value]
    return list(value) if isinstance(value, list | tuple) else []


def _runs(atlas: Atlas, run_ids: set[str]) -> list[dict[str, Any]]:
    if not run_ids:
        return []
    ids = sorted(run_ids)
    rows = atlas.execute(
        f"SELECT run_id, model_key, family, family_version, probe_set, config, config_hash, code_version, "
        f"device, tokens, seconds, status, started_at, finished_at FROM runs "
        f"WHERE run_id IN ({_placeholders(ids)}) ORDER BY model_key, family, run_id", ids).to_pylist()
    for row in rows:
        config = row["config"]
        row["config"] = json.loads(config) if isinstance(config, str) else config
        row["corpus"] = {k: v for k, v in (row["config"] or {}).items() if "corpus" in k or k == "text_field"}
        for field in ("started_at", "finished_at"):
            row[field] = row[field].isoformat() if row[field] is not None else None
    return rows


def compare(atlas: Atlas, models: list[str] | None = None, metrics: list[str] | None = None,
            concepts: list[str] | None = None, thresholds: dict[str, float] | None = None,
            top: int = TOP_K, draws: int = DRAWS) -> dict[str, Any]:
    """Everything the report shows, with the run ids behind each number; `across` holds the
    cross-model consistency of each role and concept (atlas.consistency), with `draws` null draws."""
    if top < 1:
        raise BadInput(f"--top must be at least 1, got {top}", "e.g. --top 5")
    if draws < 99:
        raise BadInput(f"--draws must be at least 99 (p-values resolve 1 / (1 + draws)), got {draws}",
                       "e.g. --draws 2000")
    infos = model_infos(atlas, models)
    keys = [m["model_key"] for m in infos]
    if metrics:
        metric_ids = list(dict.fromkeys(resolve_metric(atlas, m) for m in metrics))
    else:
        metric_ids = [r[0] for r in atlas.con.execute(
            f"SELECT DISTINCT metric FROM latest_metrics WHERE model_key IN ({_placeholders(keys)}) ORDER BY 1",
            keys).fetchall()]
    overrides = {resolve_metric(atlas, m): v for m, v in (thresholds or {}).items()}
    grids = _grids(atlas, infos, metric_ids) if metric_ids else {k: {} for k in keys}
    roles = _roles(atlas, infos, metric_ids, grids, overrides)
    concept_entries = _concepts(atlas, infos, concepts, top)
    by_key = {m["model_key"]: m for m in infos}
    top_heads = {metric: {key: _top_heads(by_key[key], grids[key][metric]["values"], top)
                          for key in keys if metric in grids[key]} for metric in metric_ids}
    used = {rid for per in grids.values() for cell in per.values() for rid in cell["run_ids"]}
    used |= {rid for c in concept_entries for m in c["models"].values() for rid in m["run_ids"]}
    version = atlas.con.execute("SELECT value FROM atlas_meta WHERE key = 'schema_version'").fetchall()
    properties = [{"id": r["metric"], "label": r["label"], "kind": "role", "threshold": r["threshold"]}
                  for r in roles]
    properties += [{"id": f"concept:{c['concept']}", "label": f"concept {c['concept']}", "kind": "concept"}
                   for c in concept_entries]
    across = consistency(atlas, infos, properties, top=top, draws=draws) if len(infos) > 1 else []
    circuits = _circuits(atlas, infos)
    return {"atlas": str(atlas.path), "schema_version": int(version[0][0]) if version else None,
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"), "top": top,
            "models": infos, "metrics": metric_ids, "grids": grids, "roles": roles,
            "top_heads": top_heads, "concepts": concept_entries, "across": across, "draws": draws,
            "circuits": circuits,
            "runs": _runs(atlas, used)}


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """The stdout part: no grids, the counts and top heads per model."""
    labels = {m["model_key"]: m["label"] for m in data["models"]}
    return {
        "atlas": data["atlas"],
        "models": [{k: m[k] for k in ("label", "model_key", "architecture", "n_layers", "n_heads", "n_kv_heads",
                                      "d_head", "format", "quantization")} for m in data["models"]],
        "metrics": data["metrics"],
        "roles": [{"label": r["label"], "metric": r["metric"], "threshold": r["threshold"],
                   "counts": {labels[k]: {"count": c["count"], "total": c["total"]} for k, c in r["counts"].items()}}
                  for r in data["roles"]],
        "top_heads": {metric: {labels[k]: [{f: h[f] for f in ("layer", "head", "kv_head", "depth", "value")}
                                          for h in heads] for k, heads in per.items()}
                      for metric, per in data["top_heads"].items()},
        "concepts": {c["concept"]: {labels[k]: [{f: h[f] for f in ("layer", "head", "kv_head", "depth", "value")}
                                                for h in m["top"]] for k, m in c["models"].items()}
                     for c in data["concepts"]},
        "across": [{"property": e["property"], "finding": e["finding"],
                    "views": {v: {f: round(s[f], 4) for f in ("observed", "null_mean", "p", "q")}
                              for v, s in e["views"].items()}} for e in data.get("across", [])],
        "runs": [r["run_id"] for r in data["runs"]],
    }


def summary_text(data: dict[str, Any], out: str | Path | None = None) -> str:
    lines = []
    for m in data["models"]:
        lines.append(f"{m['label']}: {m['architecture']}, {m['n_layers']} layers x {m['n_heads']} heads, "
                     f"{m['n_kv_heads']} KV heads ({m['group']} query heads per KV head), d_head {m['d_head']}")
    labels = {m["model_key"]: m["label"] for m in data["models"]}
    for role in data["roles"]:
        counts = ", ".join(f"{labels[k]} {c['count']}/{c['total']}" for k, c in role["counts"].items())
        lines.append(f"role {role['label']} ({role['metric']} > {role['threshold']:g}): {counts}")
    for metric, per in data["top_heads"].items():
        best = ", ".join(f"{labels[k]} L{h[0]['layer']}.H{h[0]['head']} = {h[0]['value']:.4g} "
                         f"(depth {h[0]['depth']:.2f})" for k, h in per.items() if h)
        lines.append(f"top {metric}: {best}")
    for concept in data["concepts"]:
        best = ", ".join(f"{labels[k]} L{m['top'][0]['layer']}.H{m['top'][0]['head']}"
                         for k, m in concept["models"].items() if m["top"])
        lines.append(f"concept {concept['concept']}: {best}")
    for entry in data.get("across", []):
        lines.append(f"across: {entry['finding']}")
    lines.append(f"{len(data['runs'])} runs behind these numbers")
    if out:
        lines.append(f"report -> {out}")
    return "\n".join(lines)


def _heatmap(info: dict[str, Any], metric: str, cell: dict[str, Any], zrange: tuple[float, float]) -> dict:
    n_layers, n_heads, group = info["n_layers"], info["n_heads"], info["group"]
    rows = [_head_row(info, layer, 0) for layer in range(n_layers)]
    custom = [[[h // group, r["depth"], r["layer"], h] for h in range(n_heads)] for r in rows]
    trace = {"type": "heatmap", "z": cell["values"], "zmin": zrange[0], "zmax": zrange[1],
             "x": [f"H{h}·kv{h // group}" for h in range(n_heads)],
             "y": [f"L{r['layer']} ({r['depth']:.2f})" for r in rows], "customdata": custom,
             "colorscale": "Viridis", "colorbar": {"thickness": 10},
             "hovertemplate": "L%{customdata[2]}.H%{customdata[3]}  kv_head %{customdata[0]}  depth "
                              "%{customdata[1]:.3f}<br>" + metric + " = %{z:.4g}<extra></extra>"}
    return {"data": [trace], "layout": {
        "title": {"text": f"{info['label']}: {n_layers} x {n_heads} ({info['n_kv_heads']} KV)", "font": {"size": 13}},
        "width": 170 + 38 * n_heads, "height": 110 + 15 * n_layers, "margin": {"l": 90, "r": 10, "t": 40, "b": 60},
        "yaxis": {"autorange": "reversed", "title": {"text": "layer (depth)"}, "type": "category", "automargin": True},
        "xaxis": {"title": {"text": "head · kv_head", "standoff": 6}, "type": "category", "tickangle": -60,
                  "automargin": True}}}


def _depth_scatter(data: dict[str, Any], title: str, y_title: str, points: dict[str, list[list[float]]],
                   threshold: float | None = None, mode: str = "markers") -> dict:
    traces = []
    for i, info in enumerate(data["models"]):
        pts = points.get(info["model_key"])
        if not pts:
            continue
        traces.append({"type": "scatter", "mode": mode, "name": info["label"], "meta": i,
                       "x": [p[0] for p in pts], "y": [p[1] for p in pts],
                       "customdata": [p[2:] for p in pts], "marker": {"color": PALETTE[i % len(PALETTE)], "size": 6,
                                                                       "opacity": 0.7},
                       "hovertemplate": info["label"] + (" L%{customdata[0]}.H%{customdata[1]}" if mode == "markers"
                                                         else " L%{customdata[0]}")
                       + "  depth %{x:.3f}<br>%{y:.4g}<extra></extra>"})
    layout: dict[str, Any] = {"title": {"text": title, "font": {"size": 13}}, "height": 320, "width": 560,
                              "margin": {"l": 60, "r": 10, "t": 40, "b": 50},
                              "xaxis": {"title": {"text": "normalized depth = layer / (n_layers - 1)"},
                                        "range": [-0.03, 1.03]},
                              "yaxis": {"title": {"text": y_title}}}
    if threshold is not None:
        layout["shapes"] = [{"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": threshold, "y1": threshold,
                             "line": {"dash": "dot", "color": "#555"}}]
    return {"data": traces, "layout": layout}


def figures(data: dict[str, Any]) -> dict[str, dict]:
    """Plotly figure specs keyed by the id of the div that shows them."""
    figs: dict[str, dict] = {}
    by_key = {m["model_key"]: m for m in data["models"]}
    index = {m["model_key"]: i for i, m in enumerate(data["models"])}
    roles = {r["metric"]: r for r in data["roles"]}
    for mi, metric in enumerate(data["metrics"]):
        cells = {k: per[metric] for k, per in data["grids"].items() if metric in per}
        values = [v for c in cells.values() for row in c["values"] for v in row if v is not None]
        zrange = (min(values), max(values)) if values else (0.0, 1.0)
        points = {}
        for key, cell in cells.items():
            figs[f"heat-{mi}-{index[key]}"] = _heatmap(by_key[key], metric, cell, zrange)
            points[key] = [[_head_row(by_key[key], layer, head)["depth"], v, layer, head]
                           for layer, row in enumerate(cell["values"]) for head, v in enumerate(row) if v is not None]
        role = roles.get(metric)
        figs[f"depth-{mi}"] = _depth_scatter(data, f"{metric} over normalized depth", metric, points,
                                             role["threshold"] if role else None)
    for ri, role in enumerate(data["roles"]):
        points = {k: [[_head_row(by_key[k], layer, 0)["depth"], f, layer] for layer, f in enumerate(c["per_layer"])]
                  for k, c in role["counts"].items()}
        figs[f"role-{ri}"] = _depth_scatter(
            data, f"{role['label']} heads per layer ({role['metric']} > {role['threshold']:g})",
            "fraction of the layer's heads", points, mode="lines+markers")
    for ci, concept in enumerate(data["concepts"]):
        points = {k: m["points"] for k, m in concept["models"].items()}
        figs[f"concept-{ci}"] = _depth_scatter(data, f"concept '{concept['concept']}' over normalized depth",
                                               "concept score", points)
    return figs


def page_figures(figs: dict[str, dict]) -> dict[str, dict]:
    """The figures as the page embeds them: heatmaps without their z and hover indices, which the page
    fills from the one embedded copy of the grids (the values appear once, exactly as stored)."""
    out = {}
    for fig_id, fig in figs.items():
        if fig_id.startswith("heat-"):
            trace = {k: v for k, v in fig["data"][0].items() if k not in ("z", "customdata")}
            fig = {**fig, "data": [trace]}
        elif fig_id.startswith("depth-"):  # per model: every head's (depth, value), also from the grids
            fig = {**fig, "data": [{k: v for k, v in trace.items() if k not in ("x", "y", "customdata")}
                                   for trace in fig["data"]]}
        out[fig_id] = fig
    return out


def _script_json(obj: Any) -> str:
    """JSON safe inside <script>: no '</', and NaN never appears (None instead)."""
    return json.dumps(obj, default=str, allow_nan=False).replace("</", "<\\/")


def render_html(data: dict[str, Any]) -> str:
    """One offline page: plotly.js inlined once, figures drawn from an embedded JSON block."""
    import jinja2
    from plotly.offline import get_plotlyjs

    env = jinja2.Environment(loader=jinja2.PackageLoader("atlas", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    env.filters["num"] = lambda v: "" if v is None else f"{v:.4g}"
    env.filters["exact"] = lambda v: "" if v is None else repr(float(v))
    figs = page_figures(figures(data))
    client = {"models": data["models"], "metrics": data["metrics"], "roles": [
        {k: r[k] for k in ("metric", "label", "threshold")} for r in data["roles"]],
        "grids": {k: {m: c["values"] for m, c in per.items()} for k, per in data["grids"].items()}}
    return env.get_template("report.html.j2").render(
        data=data, labels={m["model_key"]: m["label"] for m in data["models"]},
        plotly_js=get_plotlyjs(), figures_json=_script_json(figs), data_json=_script_json(client),
        config_json={r["run_id"]: json.dumps(r["config"], indent=1, sort_keys=True, default=str)
                     for r in data["runs"]})


def write_report(data: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    if not out.parent.exists():
        raise NotFound(f"the folder {out.parent} does not exist", "create it or pass another --out")
    out.write_text(render_html(data), encoding="utf-8")
    return out


__all__ = ["compare", "figures", "model_infos", "page_figures", "parse_thresholds", "render_html", "summary",
           "summary_text", "write_report"]
