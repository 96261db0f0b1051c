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
    """Per role (stored thresholds): how many heads pass, and the top heads with their scores.

    One query, answered as Arrow by DuckDB (Arrow built from Python values would import pandas)."""
    model_key = resolve_model_key(atlas, model) if model else None
    only = "AND l.model_key = ?" if model_key else ""
    keys = [model_key] if model_key else []
    table = atlas.execute(f"""
        WITH counts AS (
            SELECT l.metric, l.model_key, count(*) AS "of",
                   count(*) FILTER (WHERE l.value > t.threshold AND NOT isnan(l.value)) AS heads_above
            FROM latest_head_metrics l JOIN role_thresholds t USING (metric)
            WHERE true {only} GROUP BY l.metric, l.model_key),
        best AS (
            SELECT metric, model_key,
                   string_agg(printf('%d.%d (%.2f)', layer, head, value), ', ' ORDER BY value DESC, layer, head)
                       AS top_heads
            FROM (SELECT l.* FROM latest_head_metrics l
                  WHERE l.rank <= ? AND l.metric IN (SELECT metric FROM role_thresholds) {only}
                  QUALIFY row_number() OVER (PARTITION BY l.metric, l.model_key
                                             ORDER BY l.value DESC, l.layer, l.head) <= ?)
            GROUP BY metric, model_key)
        SELECT t.label AS role, t.metric, t.threshold, c.model_key, c.heads_above, c."of",
               coalesce(b.top_heads, '') AS top_heads
        FROM role_thresholds t JOIN counts c ON c.metric = t.metric
        LEFT JOIN best b ON b.metric = c.metric AND b.model_key = c.model_key
        ORDER BY t.metric, c.model_key""", [*keys, top, *keys, top])
    if table.num_rows == 0:
        return atlas.execute("SELECT NULL::VARCHAR AS role LIMIT 0")
    return table
