"""Head cards: everything the atlas knows about one head, written generically.

A card reads every metric of the latest complete runs (with the head's rank among all heads of
its model, both kept by the writer in `latest_head_metrics`), every head_tokens kind (promote,
suppress, lens, or any a new family adds) and any concept scores, so a new family's data appears
on the card without touching this file. Plain SQL, filtered to the one head: a card reads what it shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from atlas.errors import NotFound
from atlas.heads import parse_head
from atlas.queries import resolve_model_key

if TYPE_CHECKING:
    import pyarrow as pa

    from atlas.store import Atlas

# One head's rows of `{table}` (alias t) from the latest complete run per `{group}` (kind, concept).
LATEST_PER = """
    SELECT t.*, r.family, dense_rank() OVER (PARTITION BY t.{group} ORDER BY r.finished_at DESC) AS newest
    FROM {table} t JOIN runs r ON r.run_id = t.run_id
    WHERE r.status = 'complete' AND t.model_key = ? AND t.layer = ? AND t.head = ?
"""


def head_card(atlas: Atlas, model: str, head_spec: str, top: int = 10) -> dict[str, Any]:
    """One head's card: identity, metrics with ranks, token readouts per kind, concept scores."""
    layer, head = parse_head(head_spec)
    model_key = resolve_model_key(atlas, model)
    info = atlas.execute("SELECT * FROM models WHERE model_key = ?", [model_key]).to_pylist()[0]
    return model_head_card(atlas, info, layer, head, top, model)


def model_head_card(atlas: Atlas, info: dict[str, Any], layer: int, head: int, top: int = 10,
                    model: str | None = None) -> dict[str, Any]:
    """The card of a head of a model already looked up (`info`: its models row)."""
    model_key = info["model_key"]
    model = model or model_key
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
    return atlas.execute('SELECT metric, value, stderr, n, rank, "of" FROM latest_head_metrics '
                         "WHERE model_key = ? AND layer = ? AND head = ? ORDER BY metric", [model_key, layer, head])


def head_tokens(atlas: Atlas, model_key: str, layer: int, head: int, top: int) -> dict[str, pa.Table]:
    """{kind: table of rank, token_text, token_id, score} from the latest complete run per kind.

    The rows come sorted by kind and are sliced, not filtered: a filter on a Python value would
    import pandas (pyarrow converts the value), which `atlas show` would pay for at start-up."""
    table = atlas.execute(f"""
        SELECT kind, rank, token_text, token_id, score, family
        FROM ({LATEST_PER.format(table="head_tokens", group="kind")})
        WHERE newest = 1 AND rank <= ? ORDER BY kind, rank""", [model_key, layer, head, top])
    kinds = table.column("kind").to_pylist()
    rest = table.drop_columns(["kind"])
    out: dict[str, pa.Table] = {}
    start = 0
    for end in range(1, len(kinds) + 1):
        if end == len(kinds) or kinds[end] != kinds[start]:
            out[kinds[start]] = rest.slice(start, end - start)
            start = end
    return out


def concept_scores(atlas: Atlas, model_key: str, layer: int, head: int, top: int) -> pa.Table:
    """Concept scores of the head (latest complete run per concept), best first."""
    return atlas.execute(f"""
        SELECT concept, score, rank, family
        FROM ({LATEST_PER.format(table="concept_scores", group="concept")})
        WHERE newest = 1 ORDER BY score DESC LIMIT ?""", [model_key, layer, head, top])


def card_json(card: dict[str, Any]) -> dict[str, Any]:
    """The card with its Arrow tables as lists of rows."""
    import pyarrow as pa

    return {**{k: v for k, v in card.items() if not isinstance(v, pa.Table | dict)},
            "metrics": card["metrics"].to_pylist(),
            "tokens": {kind: t.to_pylist() for kind, t in card["tokens"].items()},
            "concepts": card["concepts"].to_pylist()}
