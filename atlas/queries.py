"""Read-only questions the CLI and the API ask of an atlas, built with SQLAlchemy Core."""

from __future__ import annotations

import pyarrow as pa
import sqlalchemy as sa

from atlas import schema
from atlas.errors import NotFound
from atlas.store import Atlas

latest = sa.table("latest_metrics", *(sa.column(c.name) for c in schema.head_metrics.columns))
heads_view = sa.table("heads", sa.column("model_key"), sa.column("alias"), sa.column("layer"),
                      sa.column("head"), sa.column("kv_head"), sa.column("depth"))
models = schema.models


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


def model_filter(spec: str) -> sa.ColumnElement[bool]:
    return sa.or_(models.c.alias == spec, models.c.model_key == spec,
                  models.c.model_key.startswith(spec + "@", autoescape=True))  # a % or _ is itself


def resolve_model_key(atlas: Atlas, spec: str) -> str:
    keys = atlas.execute(sa.select(models.c.model_key).where(model_filter(spec))).column(0).to_pylist()
    if len(keys) == 1:
        return keys[0]
    known = atlas.execute(sa.select(models.c.alias, models.c.model_key)).to_pylist()
    listing = ", ".join(f"{r['alias'] or '-'} ({r['model_key']})" for r in known) or "none yet"
    if keys:
        raise NotFound(f"'{spec}' matches several models: {', '.join(keys)}", "pass the full model key")
    raise NotFound(f"no model '{spec}' in {atlas.path}", f"models in this atlas: {listing}")


def rank_heads(atlas: Atlas, metric: str, model: str | None = None, top: int = 10,
               ascending: bool = False) -> pa.Table:
    """Heads ordered by one metric (latest complete run), with kv_head and normalized depth."""
    metric_id = resolve_metric(atlas, metric)
    value = latest.c.value
    rank = sa.func.rank().over(partition_by=latest.c.model_key,
                               order_by=value.asc() if ascending else value.desc())
    stmt = (
        sa.select(models.c.alias.label("model"), latest.c.layer, latest.c.head, heads_view.c.kv_head,
                  sa.func.round(heads_view.c.depth, 3).label("depth"), latest.c.metric, value,
                  latest.c.stderr, rank.label("rank"), latest.c.model_key)
        .select_from(latest.join(models, models.c.model_key == latest.c.model_key)
                     .join(heads_view, sa.and_(heads_view.c.model_key == latest.c.model_key,
                                               heads_view.c.layer == latest.c.layer,
                                               heads_view.c.head == latest.c.head)))
        .where(latest.c.metric == metric_id)
    )
    if model:
        stmt = stmt.where(latest.c.model_key == resolve_model_key(atlas, model))
    ranked = stmt.subquery()
    final = (sa.select(ranked).where(ranked.c.rank <= top)
             .order_by(ranked.c.model_key, ranked.c.rank, ranked.c.layer, ranked.c.head))
    return atlas.execute(final)


def list_models(atlas: Atlas) -> pa.Table:
    runs = schema.runs
    n_runs = (sa.select(sa.func.count()).where(runs.c.model_key == models.c.model_key,
                                               runs.c.status == "complete").scalar_subquery())
    stmt = sa.select(models.c.alias, models.c.model_key, models.c.architecture, models.c.n_layers,
                     models.c.n_heads, models.c.n_kv_heads, models.c.d_head, models.c.format,
                     models.c.quantization, n_runs.label("complete_runs")).order_by(models.c.model_key)
    return atlas.execute(stmt)


def role_summary(atlas: Atlas, model: str | None = None, top: int = 5) -> pa.Table:
    """Per role (stored thresholds): how many heads pass, and the top heads with their scores."""
    model_key = resolve_model_key(atlas, model) if model else None
    thresholds = schema.role_thresholds
    roles = atlas.execute(sa.select(thresholds.c.metric, thresholds.c.threshold, thresholds.c.label)
                          .order_by(thresholds.c.metric)).to_pylist()
    rows = []
    for role in roles:
        stmt = (sa.select(latest.c.model_key, latest.c.layer, latest.c.head, latest.c.value)
                .where(latest.c.metric == role["metric"])
                .order_by(latest.c.model_key, latest.c.value.desc()))
        if model_key:
            stmt = stmt.where(latest.c.model_key == model_key)
        by_model: dict[str, list[dict]] = {}
        for row in atlas.execute(stmt).to_pylist():
            by_model.setdefault(row["model_key"], []).append(row)
        for key, heads in by_model.items():
            rows.append({"role": role["label"], "metric": role["metric"], "threshold": role["threshold"],
                         "model_key": key, "heads_above": sum(r["value"] > role["threshold"] for r in heads),
                         "of": len(heads),
                         "top_heads": ", ".join(f"{r['layer']}.{r['head']} ({r['value']:.2f})"
                                                for r in heads[:top])})
    return pa.Table.from_pylist(rows) if rows else pa.table({"role": pa.array([], pa.string())})
