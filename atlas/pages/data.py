"""Read queries the API and the pages share: a head card, concept rankings, heatmap grids.

All read the latest complete run (as `latest_metrics` does), so a rebuilt family supersedes its
older numbers while the history stays in the tables.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from atlas.errors import BadInput, NotFound

MAX_INDEX = 2**31 - 1  # layer and head numbers past this are not numbers of any model

# Latest complete run per (model, concept), as latest_metrics does for metrics: the run is picked from
# the small concept_runs index the writer keeps (schema.LATEST_CONCEPT_RUNS), so only its rows are read.
LATEST_CONCEPTS = """
    SELECT cs.* FROM concept_scores cs
    JOIN (SELECT cr.run_id, cr.concept FROM concept_runs cr JOIN runs r USING (run_id)
          WHERE r.status = 'complete'
          QUALIFY row_number() OVER (PARTITION BY cr.model_key, cr.concept
                                     ORDER BY r.finished_at DESC, r.run_id) = 1) lr
      ON lr.run_id = cs.run_id AND lr.concept = cs.concept
"""


def check_top(top: int, limit: int) -> int:
    """Request parameters are checked before they reach SQL (a negative top once meant every row)."""
    if not 0 < top <= limit:
        raise BadInput(f"top must be between 1 and {limit}, not {top}", "e.g. top=10")
    return top


def check_index(layer: int, head: int) -> None:
    if not (0 <= layer <= MAX_INDEX and 0 <= head <= MAX_INDEX):
        raise BadInput(f"layer and head must be between 0 and {MAX_INDEX}", "e.g. /api/heads/llama/3/4")


def exact_model_key(atlas: Any, spec: str) -> str:
    """The model an alias, a full key or a `name@` prefix names, matched exactly: no LIKE, so `%`
    and `_` in a name are just characters (a client's model name never matches as a pattern)."""
    keys = atlas.execute("SELECT model_key FROM models WHERE alias = ? OR model_key = ? "
                         "OR starts_with(model_key, ?) ORDER BY 1", [spec, spec, spec + "@"]).column(0).to_pylist()
    if len(keys) == 1:
        return keys[0]
    if keys:
        raise NotFound(f"'{spec}' matches several models: {', '.join(keys)}", "pass the full model key")
    known = atlas.execute("SELECT alias, model_key FROM models ORDER BY model_key").to_pylist()
    listing = ", ".join(f"{r['alias'] or '-'} ({r['model_key']})" for r in known) or "none yet"
    raise NotFound(f"no model '{spec}' in this atlas", f"models in this atlas: {listing}")


def model_row(atlas: Any, model: str) -> dict[str, Any]:
    """The models row an alias, a full key or a `name@` prefix names (exactly, as exact_model_key)."""
    found = atlas.execute("SELECT * FROM models WHERE alias = ? OR model_key = ? OR starts_with(model_key, ?) "
                          "ORDER BY model_key", [model, model, model + "@"]).to_pylist()
    if len(found) == 1:
        return found[0]
    exact_model_key(atlas, model)  # raises the not-found or ambiguous error
    raise AssertionError("unreachable: exact_model_key found one model where model_row found none")


def head_card(atlas: Any, model: str, layer: int, head: int, top: int = 10) -> dict[str, Any]:
    """The head card of atlas/cards.py (metrics with their rank in the model, tokens per kind, concept
    scores), plus the head's role labels and the model's runs, which the head page shows."""
    from atlas.cards import card_json, model_head_card
    from atlas.examples import head_examples

    m = model_row(atlas, model)  # one lookup: the card parts below take the row
    card = card_json(model_head_card(atlas, m, layer, head, top, m["model_key"]))
    thresholds = atlas.execute("SELECT metric, label, threshold FROM role_thresholds").to_pylist()
    values = {m["metric"]: m["value"] for m in card["metrics"]}
    labels = sorted(({"label": t["label"], "metric": t["metric"], "value": values[t["metric"]],
                      "threshold": t["threshold"]} for t in thresholds
                     if t["metric"] in values and values[t["metric"]] > t["threshold"]),
                    key=lambda r: (r["label"], r["metric"]))  # head_labels' rows of this head
    runs = atlas.execute("SELECT run_id, family, family_version, probe_set, status, finished_at FROM runs "
                         "WHERE model_key = ? ORDER BY family, finished_at", [card["model_key"]]).to_pylist()
    examples = head_examples(atlas, card["model_key"], layer, head)  # {} where no examples run exists
    return {**card, "n_layers": m["n_layers"], "n_heads": m["n_heads"], "labels": labels, "runs": runs,
            "examples": examples}


def list_concepts(atlas: Any) -> pa.Table:
    return atlas.execute(f"""
        SELECT s.concept, count(DISTINCT s.model_key) AS models, any_value(c.words) AS words,
               any_value(c.source) AS source
        FROM ({LATEST_CONCEPTS}) s LEFT JOIN concepts c ON c.name = s.concept
        GROUP BY s.concept ORDER BY s.concept
    """)


def concept_heads(atlas: Any, concept: str, model: str | None = None, top: int = 10) -> pa.Table:
    """The top `top` heads per model for one concept (rank 1 = most specialized)."""
    where, params = "concept = ?", [concept, top]
    if model:
        where += " AND s.model_key = ?"
        params.insert(1, exact_model_key(atlas, model))
    table = atlas.execute(f"""
        SELECT coalesce(m.alias, s.model_key) AS model, s.layer, s.head, s.concept, s.score, s.rank,
               s.model_key, s.run_id
        FROM ({LATEST_CONCEPTS}) s JOIN models m USING (model_key)
        WHERE {where} AND s.rank <= ? ORDER BY s.model_key, s.rank, s.layer, s.head
    """, params)
    if table.num_rows == 0:
        known = list_concepts(atlas).column("concept").to_pylist()
        raise NotFound(f"no scores for concept '{concept}'" + (f" in {model}" if model else ""),
                       f"concepts in this atlas: {', '.join(known) or 'none yet - build the pursuit family'}")
    return table


def concept_words(atlas: Any, concept: str) -> list[str]:
    found = atlas.execute("SELECT words FROM concepts WHERE name = ?", [concept]).column(0).to_pylist()
    if not found or found[0] is None:
        return []
    words = found[0]
    return json.loads(words) if isinstance(words, str) else list(words)


def heatmaps(atlas: Any, model_key: str) -> dict[str, list[list[float | None]]]:
    """{metric: grid[layer][head]} of the latest values, for the model overview."""
    m = atlas.execute("SELECT n_layers, n_heads FROM models WHERE model_key = ?", [model_key]).to_pylist()[0]
    grids: dict[str, list[list[float | None]]] = {}
    for r in atlas.execute("SELECT metric, layer, head, value FROM latest_metrics WHERE model_key = ? "
                           "ORDER BY metric", [model_key]).to_pylist():
        grid = grids.setdefault(r["metric"], [[None] * m["n_heads"] for _ in range(m["n_layers"])])
        if r["layer"] < m["n_layers"] and r["head"] < m["n_heads"]:
            grid[r["layer"]][r["head"]] = r["value"]
    return grids


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: send null."""
    if isinstance(value, float):
        return None if value != value or value in (float("inf"), float("-inf")) else value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def rows(table: pa.Table) -> list[dict[str, Any]]:
    return json_safe(table.to_pylist())
