"""Head cards: everything the atlas knows about one head, written generically.

A card reads every metric of the latest complete runs (with the head's rank among all heads of
its model), every head_tokens kind (promote, suppress, lens, or any a new family adds) and any concept
scores, so a new family's data appears on the card without touching this file. All three come from
the derived tables the writer keeps at ingest (`latest_head_metrics`, `latest_head_tokens`,
`latest_concept_scores`), looked up by the model's integer model_id, layer and head: a card reads what
it shows, however much history and however many models the atlas holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from atlas.errors import NotFound
from atlas.heads import parse_head
from atlas.queries import resolve_model_key

if TYPE_CHECKING:
    import pyarrow as pa

    from atlas.store import Atlas

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
    model_id = model_id_of(atlas, model_key)
    return {**identity, "metrics": head_metrics(atlas, model_id, layer, head),
            "tokens": head_tokens(atlas, model_id, layer, head, top),
            "concepts": concept_scores(atlas, model_id, layer, head, top)}


def model_id_of(atlas: Atlas, model_key: str) -> int:
    """The model's integer id in the derived tables (-1 for a model with no ingested run: no rows)."""
    found = atlas.execute("SELECT model_id FROM model_ids WHERE model_key = ?", [model_key]).column(0).to_pylist()
    return int(found[0]) if found else -1


def head_metrics(atlas: Atlas, model_id: int, layer: int, head: int) -> pa.Table:
    """Every latest metric of the head with its rank (1 = highest value) among the model's heads."""
    return atlas.execute('SELECT metric, value, stderr, n, rank, "of" FROM latest_head_metrics '
                         "WHERE model_id = ? AND layer = ? AND head = ? ORDER BY metric", [model_id, layer, head])


def head_tokens(atlas: Atlas, model_id: int, layer: int, head: int, top: int) -> dict[str, pa.Table]:
    """{kind: table of rank, token_text, token_id, score} from the latest complete run per kind.

    The rows come sorted by kind and are sliced, not filtered: a filter on a Python value would
    import pandas (pyarrow converts the value), which `atlas show` would pay for at start-up."""
    table = atlas.execute("""
        SELECT kind, rank, token_text, token_id, score, family FROM latest_head_tokens
        WHERE model_id = ? AND layer = ? AND head = ? AND rank <= ? ORDER BY kind, rank""",
                          [model_id, layer, head, top])
    kinds = table.column("kind").to_pylist()
    rest = table.drop_columns(["kind"])
    out: dict[str, pa.Table] = {}
    start = 0
    for end in range(1, len(kinds) + 1):
        if end == len(kinds) or kinds[end] != kinds[start]:
            out[kinds[start]] = rest.slice(start, end - start)
            start = end
    return out


def concept_scores(atlas: Atlas, model_id: int, layer: int, head: int, top: int) -> pa.Table:
    """Concept scores of the head (latest complete run per concept), best first."""
    return atlas.execute("""
        SELECT concept, score, rank, family FROM latest_concept_scores
        WHERE model_id = ? AND layer = ? AND head = ? ORDER BY score DESC LIMIT ?""", [model_id, layer, head, top])


def card_json(card: dict[str, Any]) -> dict[str, Any]:
    """The card with its Arrow tables as lists of rows."""
    import pyarrow as pa

    return {**{k: v for k, v in card.items() if not isinstance(v, pa.Table | dict)},
            "metrics": card["metrics"].to_pylist(),
            "tokens": {kind: t.to_pylist() for kind, t in card["tokens"].items()},
            "concepts": card["concepts"].to_pylist()}
