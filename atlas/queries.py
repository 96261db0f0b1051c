"""Read-only questions the CLI and the API ask of an atlas.

Plain SQL over the derived tables the writer keeps at ingest (atlas/schema.py): `latest_head_metrics`
holds each head's latest value with its rank in its model, so a ranking reads the rows it returns
instead of ranking the atlas's history on every call. No SQLAlchemy here: `atlas heads` starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from atlas.errors import NotFound

if TYPE_CHECKING:
    import pyarrow as pa

    from atlas.store import Atlas

# kv_head and depth as the `heads` view computes them, from a latest_head_metrics row `l` and its models
# row `m` (layer and head cast to BIGINT: the view's types, so results are the same column for column)
HEAD_PLACE = """CAST(l.head AS BIGINT) // (m.n_heads // m.n_kv_heads) AS kv_head,
    round(CASE WHEN m.n_layers > 1 THEN CAST(l.layer AS BIGINT) / (m.n_layers - 1) ELSE 0.0 END, 3) AS depth"""
IN_MODEL = "l.layer >= 0 AND l.layer < m.n_layers AND l.head >= 0 AND l.head < m.n_heads"


def resolve_metric(atlas: Atlas, name: str) -> str:
    """Accept `patterns.induction` or the short `induction` when it is unambiguous."""
    known = [row[0] for row in atlas.metric_ids()]
    if name in known:
        return name
    matches = [m for m in known if m.split(".", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise NotFound(f"metric '{name}' is ambiguous: {', '.join(matches)}", "give the full family.metric id")
    raise NotFound(f"no metric '{name}' in {atlas.path}",
                   f"known metrics: {', '.join(known) or 'none yet - run atlas build'}")


def resolve_model_key(atlas: Atlas, spec: str) -> str:
    """The model an alias, a full key or a `name@` prefix names (matched exactly, never as a pattern)."""
    keys = [r[0] for r in atlas.con.execute(
        "SELECT model_key FROM models WHERE alias = ? OR model_key = ? OR starts_with(model_key, ?) ORDER BY 1",
        [spec, spec, spec + "@"]).fetchall()]
    if len(keys) == 1:
        return keys[0]
    known = atlas.con.execute("SELECT alias, model_key FROM models").fetchall()
    listing = ", ".join(f"{alias or '-'} ({key})" for alias, key in known) or "none yet"
    if keys:
        raise NotFound(f"'{spec}' matches several models: {', '.join(keys)}", "pass the full model key")
    raise NotFound(f"no model '{spec}' in {atlas.path}", f"models in this atlas: {listing}")


def rank_heads(atlas: Atlas, metric: str, model: str | None = None, top: int = 10,
               ascending: bool = False) -> pa.Table:
    """Heads ordered by one metric (latest complete run), with kv_head and normalized depth.

    Highest first reads the rank stored at ingest (rows with rank <= top); lowest first ranks the
    metric's rows (of one model, or of every model) here."""
    metric_id = resolve_metric(atlas, metric)
    where, params = ["l.metric = ?"], [metric_id]
    if model:
        where.append("l.model_key = ?")
        params.append(resolve_model_key(atlas, model))
    if ascending:
        source = (f"(SELECT * EXCLUDE (rank), rank() OVER (PARTITION BY model_key ORDER BY value ASC) AS rank "
                  f"FROM latest_head_metrics l WHERE {' AND '.join(where)})")
    else:
        source = "latest_head_metrics"
    return atlas.execute(f"""
        SELECT m.alias AS model, l.layer, l.head, {HEAD_PLACE}, l.metric, l.value, l.stderr, l.rank, l.model_key
        FROM {source} l JOIN models m ON m.model_key = l.model_key
        WHERE {' AND '.join(where)} AND l.rank <= ? AND {IN_MODEL}
        ORDER BY l.model_key, l.rank, l.layer, l.head""", [*(params if ascending else []), *params, top])


def list_models(atlas: Atlas) -> pa.Table:
    return atlas.execute("""
        SELECT m.alias, m.model_key, m.architecture, m.n_layers, m.n_heads, m.n_kv_heads, m.d_head, m.format,
               m.quantization,
               (SELECT count(*) FROM runs r WHERE r.model_key = m.model_key AND r.status = 'complete')
                   AS complete_runs
        FROM models m ORDER BY m.model_key""")


def role_summary(atlas: Atlas, model: str | None = None, top: int = 5) -> pa.Table:
    """Per role (stored thresholds): how many heads pass, and the top heads with their scores."""
    import pyarrow as pa

    model_key = resolve_model_key(atlas, model) if model else None
    roles = atlas.con.execute("SELECT metric, threshold, label FROM role_thresholds ORDER BY metric").fetchall()
    rows = []
    for metric, threshold, label in roles:
        where, params = "metric = ?", [metric]
        if model_key:
            where, params = where + " AND model_key = ?", [metric, model_key]
        counts = atlas.con.execute(
            f"SELECT model_key, count(*) FILTER (WHERE value > ? AND NOT isnan(value)), count(*) "
            f"FROM latest_head_metrics WHERE {where} GROUP BY model_key ORDER BY model_key",
            [threshold, *params]).fetchall()
        best: dict[str, list[tuple[int, int, float]]] = {}
        for key, layer, head, value in atlas.con.execute(
                f"SELECT model_key, layer, head, value FROM latest_head_metrics WHERE {where} AND rank <= ? "
                f"ORDER BY model_key, value DESC, layer, head", [*params, top]).fetchall():
            best.setdefault(key, []).append((layer, head, value))
        for key, above, total in counts:
            rows.append({"role": label, "metric": metric, "threshold": threshold, "model_key": key,
                         "heads_above": above, "of": total,
                         "top_heads": ", ".join(f"{layer}.{head} ({value:.2f})"
                                                for layer, head, value in best.get(key, [])[:top])})
    return pa.Table.from_pylist(rows) if rows else pa.table({"role": pa.array([], pa.string())})
