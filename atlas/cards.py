"""Head cards: everything the atlas knows about one head, written generically.

A card reads every metric of the latest complete runs (with the head's rank among all heads of
its model), every head_tokens kind (promote, suppress, lens, or any a new family adds) and any
concept scores, so a new family's data appears on the card without touching this file.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from atlas import schema
from atlas.errors import NotFound
from atlas.heads import parse_head
from atlas.queries import latest, resolve_model_key
from atlas.store import Atlas

runs = schema.runs
models = schema.models


def _latest_per(table: sa.Table, model_key: str, layer: int, head: int, group: sa.ColumnElement) -> Any:
    """Rows of `table` for one head from the latest complete run per `group` (kind, concept)."""
    newest = sa.func.dense_rank().over(partition_by=group, order_by=runs.c.finished_at.desc()).label("newest")
    inner = (sa.select(table, runs.c.family, newest)
             .select_from(table.join(runs, runs.c.run_id == table.c.run_id))
             .where(runs.c.status == "complete", table.c.model_key == model_key,
                    table.c.layer == layer, table.c.head == head)
             .subquery())
    return inner


def head_card(atlas: Atlas, model: str, head_spec: str, top: int = 10) -> dict[str, Any]:
    """One head's card: identity, metrics with ranks, token readouts per kind, concept scores."""
    layer, head = parse_head(head_spec)
    model_key = resolve_model_key(atlas, model)
    info = atlas.execute(sa.select(models).where(models.c.model_key == model_key)).to_pylist()[0]
    if not (0 <= layer < info["n_layers"] and 0 <= head < info["n_heads"]):
        raise NotFound(f"{model} has no head {layer}.{head}",
                       f"layers 0..{info['n_layers'] - 1}, heads 0..{info['n_heads'] - 1}")
    group_size = info["n_heads"] // info["n_kv_heads"]
    identity = {"model": info["alias"] or model_key, "model_key": model_key, "layer": layer, "head": head,
                "kv_head": head // group_size,
                "depth": round(layer / (info["n_layers"] - 1), 3) if info["n_layers"] > 1 else 0.0}
    return {**identity, "metrics": head_metrics(atlas, model_key, layer, head),
            "tokens": head_tokens(atlas, model_key, layer, head, top),
            "concepts": concept_scores(atlas, model_key, layer, head, top)}


def head_metrics(atlas: Atlas, model_key: str, layer: int, head: int) -> pa.Table:
    """Every latest metric of the head with its rank (1 = highest value) among the model's heads."""
    ranked = (sa.select(latest.c.layer, latest.c.head, latest.c.metric, latest.c.value, latest.c.stderr,
                        latest.c.n,
                        sa.func.rank().over(partition_by=latest.c.metric,
                                            order_by=latest.c.value.desc()).label("rank"),
                        sa.func.count().over(partition_by=latest.c.metric).label("of"))
              .where(latest.c.model_key == model_key).subquery())
    stmt = (sa.select(ranked.c.metric, ranked.c.value, ranked.c.stderr, ranked.c.n, ranked.c.rank, ranked.c.of)
            .where(ranked.c.layer == layer, ranked.c.head == head).order_by(ranked.c.metric))
    return atlas.execute(stmt)


def head_tokens(atlas: Atlas, model_key: str, layer: int, head: int, top: int) -> dict[str, pa.Table]:
    """{kind: table of rank, token_text, token_id, score} from the latest complete run per kind."""
    t = schema.head_tokens
    inner = _latest_per(t, model_key, layer, head, t.c.kind)
    stmt = (sa.select(inner.c.kind, inner.c.rank, inner.c.token_text, inner.c.token_id, inner.c.score,
                      inner.c.family)
            .where(inner.c.newest == 1, inner.c.rank <= top).order_by(inner.c.kind, inner.c.rank))
    table = atlas.execute(stmt)
    out: dict[str, pa.Table] = {}
    for kind in sorted(set(table.column("kind").to_pylist())):
        mask = pc.equal(table.column("kind"), kind)
        out[kind] = table.filter(mask).drop_columns(["kind"])
    return out


def concept_scores(atlas: Atlas, model_key: str, layer: int, head: int, top: int) -> pa.Table:
    """Concept scores of the head (latest complete run per concept), best first."""
    c = schema.concept_scores
    inner = _latest_per(c, model_key, layer, head, c.c.concept)
    stmt = (sa.select(inner.c.concept, inner.c.score, inner.c.rank, inner.c.family)
            .where(inner.c.newest == 1).order_by(inner.c.score.desc()).limit(top))
    return atlas.execute(stmt)


def card_json(card: dict[str, Any]) -> dict[str, Any]:
    """The card with its Arrow tables as lists of rows."""
    return {**{k: v for k, v in card.items() if not isinstance(v, pa.Table | dict)},
            "metrics": card["metrics"].to_pylist(),
            "tokens": {kind: t.to_pylist() for kind, t in card["tokens"].items()},
            "concepts": card["concepts"].to_pylist()}
