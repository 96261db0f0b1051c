"""Example contexts per head (head_examples, written by the `examples` family): reads and formats.

A head's examples come from the latest complete run that stored examples for that head, read in one
query filtered to the head. Older atlas files (schema version 2 and before) have no such rows: a
read-only handle sees an empty table (Atlas._compat_views), so every function here returns nothing.

HeadVis: `headvis_sequences` turns `max_attention` examples into the `sequences` of Neuronpedia's
HeadVis head files (utils/neuronpedia-utils/neuronpedia_utils/headvis in hijohnnylin/neuronpedia):
`tokens`, sparse `attention_indices` (q * len(tokens) + k) and `attention_values`, `max_activation`
(the largest weight to a key other than the first, which is `max_attention`'s score) and `interval`.
Ours carry one query row per sequence (the example's query), all in interval 0 of 1.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atlas.store import Atlas

COLUMNS = ", ".join(f"e.{c}" for c in ("criterion", "rank", "score", "tokens", "token_ids", "query_pos", "attention",
                                         "source_window", "source_pos", "run_id"))
JSON_COLUMNS = ("tokens", "token_ids", "attention")

# Per head, the rows of the latest complete run that stored examples for it, among the rows `{where}` selects.
LATEST_EXAMPLES = """
    SELECT e.layer, e.head, {columns} FROM head_examples e JOIN runs r USING (run_id)
    WHERE r.status = 'complete' AND {where}
    QUALIFY dense_rank() OVER (PARTITION BY e.layer, e.head ORDER BY r.finished_at DESC, e.run_id DESC) = 1
    ORDER BY e.layer, e.head, e.criterion, e.rank
"""


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    """A row with its JSON columns as lists (DuckDB hands JSON back as text)."""
    return {**row, **{c: json.loads(row[c]) if isinstance(row[c], str) else row[c] for c in JSON_COLUMNS}}


def head_examples(atlas: Atlas, model_key: str, layer: int, head: int) -> dict[str, list[dict[str, Any]]]:
    """{criterion: examples, best first} of one head, from the latest complete run that has them."""
    where = "e.model_key = ? AND e.layer = ? AND e.head = ?"
    rows = atlas.execute(LATEST_EXAMPLES.format(columns=COLUMNS, where=where), [model_key, layer, head]).to_pylist()
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["criterion"], []).append(_decoded(row))
    return out


def model_examples(atlas: Atlas, model_key: str) -> dict[tuple[int, int], dict[str, list[dict[str, Any]]]]:
    """{(layer, head): {criterion: examples}} for every head of a model with examples (for exports)."""
    out: dict[tuple[int, int], dict[str, list[dict[str, Any]]]] = {}
    for row in atlas.execute(LATEST_EXAMPLES.format(columns=COLUMNS, where="e.model_key = ?"), [model_key]).to_pylist():
        out.setdefault((row["layer"], row["head"]), {}).setdefault(row["criterion"], []).append(_decoded(row))
    return out


def headvis_sequences(examples: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """HeadVis `sequences` from a head's `max_attention` examples: the query row as sparse COO (non-zero
    weights only), `max_activation` = the example's score; our own keys (criterion, rank, query_pos,
    token_ids) ride along, and HeadVis's loader ignores them."""
    sequences = []
    for example in examples.get("max_attention", []):
        n, q = len(example["tokens"]), example["query_pos"]
        nonzero = [(k, v) for k, v in enumerate(example["attention"]) if v > 0]
        sequences.append({"tokens": example["tokens"], "attention_indices": [q * n + k for k, _ in nonzero],
                          "attention_values": [v for _, v in nonzero], "max_activation": example["score"],
                          "interval": 0, "criterion": "max_attention", "rank": example["rank"], "query_pos": q,
                          "token_ids": example["token_ids"]})
    return sequences


def context_text(example: dict[str, Any], width: int = 8) -> str:
    """An example as one line for a terminal: the last `width` tokens up to the query, the query in
    {braces}, the key it attends to most in <angle brackets> (when that is not the query itself).
    No square brackets: rich, which prints tables in a terminal, reads them as markup."""
    tokens, q, row = example["tokens"], example["query_pos"], example["attention"]
    peak = max(range(q + 1), key=lambda k: row[k])
    shown = []
    for k in range(max(0, q - width + 1), q + 1):
        text = tokens[k].replace("\n", "\\n")
        shown.append(f"{{{text}}}" if k == q else f"<{text}>" if k == peak else text)
    return "".join(shown)
