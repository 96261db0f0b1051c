"""Match heads across models: for a head of model A, the most similar heads of model B.

Two views of similarity, both in [0, 1], higher = more alike:

- `profile`: the heads' vectors of role/metric scores (every metric both models have, plus
  concept scores for concepts both have). Scales differ across models (an induction score of 0.3
  is strong in one model and middling in another), so each feature is rank-normalized within its
  model first: percentile = (average rank - 1) / (n_heads_total - 1). profile = 1 - the mean over
  families of the family's mean |p_A - p_B|: each family counts once, so pursuit's 36 concept
  features do not outweigh the 10 pattern scores (`feature_family`). Metrics that name another head
  (`is_identifier`) and metrics with one value for every head of a model are not features.
  Two unrelated heads score about 2/3 (E|U - V| = 1/3 for independent uniforms); identical rank
  profiles score 1. Failure case: features where most heads sit near zero (induction) rank by
  noise among the near-zero heads, which pulls unrelated "inactive" heads together.
- `tokens`: overlap of the heads' lens readouts (`head_tokens`, latest run per model and kind):
  Jaccard overlap of the token texts (lower-cased, stripped of the tokenizer's space markers,
  since vocabularies differ), averaged over the kinds both models have (promote, suppress, ...).
  None when either model has no readouts.

`score` orders the candidates: one view when asked for, or with `by="both"` the mean of the two
views' percentiles among model B's heads (so the two scales count equally); when only one view
exists (no lens readouts yet), `both` is that view.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pyarrow as pa

from atlas.errors import BadInput, NotFound
from atlas.heads import parse_head
from atlas.queries import resolve_model_key
from atlas.store import Atlas

BY = ("both", "profile", "tokens")
_SPACE_MARKERS = "Ġ▁Ċ "


def _model(atlas: Atlas, spec: str) -> dict[str, Any]:
    key = resolve_model_key(atlas, spec)
    row = atlas.execute("SELECT * FROM models WHERE model_key = ?", [key]).to_pylist()[0]
    row["group"] = row["n_heads"] // max(row["n_kv_heads"], 1)
    return row


def is_identifier(metric: str) -> bool:
    """A metric that names another head (circuits' composition partner): an index, not a score to rank."""
    return metric.endswith(("_partner_layer", "_partner_head"))


def feature_family(name: str) -> str:
    """The family a profile feature comes from; concept scores are Head Pursuit's."""
    return "pursuit" if name.startswith("concept:") else name.split(".", 1)[0]


def _features(atlas: Atlas, key: str) -> dict[str, dict[tuple[int, int], float]]:
    """{feature: {(layer, head): value}} from the latest metrics and concept scores of one model: the
    metrics that score heads (not identifiers, not one value for every head)."""
    feats: dict[str, dict[tuple[int, int], float]] = {}
    for r in atlas.execute("SELECT metric, layer, head, value FROM latest_metrics WHERE model_key = ?",
                           [key]).to_pylist():
        if not is_identifier(r["metric"]):
            feats.setdefault(r["metric"], {})[(r["layer"], r["head"])] = r["value"]
    rows = atlas.execute("""
        SELECT cs.concept, cs.layer, cs.head, cs.score FROM concept_scores cs JOIN runs r USING (run_id)
        WHERE r.status = 'complete' AND cs.model_key = ?
        QUALIFY row_number() OVER (PARTITION BY cs.concept, cs.layer, cs.head ORDER BY r.finished_at DESC) = 1""",
                         [key]).to_pylist()
    for r in rows:
        feats.setdefault(f"concept:{r['concept']}", {})[(r["layer"], r["head"])] = r["score"]
    return {name: column for name, column in feats.items()
            if len({v for v in column.values() if v is not None and v == v}) > 1}


def family_groups(names: list[str]) -> dict[str, list[int]]:
    """Indices of `names` per family, in order."""
    groups: dict[str, list[int]] = {}
    for j, name in enumerate(names):
        groups.setdefault(feature_family(name), []).append(j)
    return groups


def percentiles(values: np.ndarray) -> np.ndarray:
    """Average-rank percentiles in [0, 1] of a 1-D array (NaN stays NaN). values: (n,) -> (n,)."""
    out = np.full(values.shape, np.nan)
    ok = ~np.isnan(values)
    x = values[ok]
    if x.size == 0:
        return out
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(x.size, dtype=float)
    # ties share their average rank
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = sums[inverse] / counts[inverse]
    out[ok] = ranks / (x.size - 1) if x.size > 1 else 0.5
    return out


def _profile_matrix(feats: dict[str, dict[tuple[int, int], float]], names: list[str],
                    heads: list[tuple[int, int]]) -> np.ndarray:
    """(n_heads, n_features) percentiles within the model."""
    mat = np.full((len(heads), len(names)), np.nan)
    for j, name in enumerate(names):
        col = np.array([feats[name].get(h, np.nan) for h in heads], dtype=float)
        mat[:, j] = percentiles(col)
    return mat


def _norm_token(text: str) -> str:
    return text.strip(_SPACE_MARKERS + "\t\n").lower()


def _token_sets(atlas: Atlas, key: str) -> dict[str, dict[tuple[int, int], set[str]]]:
    rows = atlas.execute("""
        SELECT ht.kind, ht.layer, ht.head, ht.token_text FROM head_tokens ht JOIN runs r USING (run_id)
        WHERE r.status = 'complete' AND ht.model_key = ?
        QUALIFY dense_rank() OVER (PARTITION BY ht.kind ORDER BY r.finished_at DESC, ht.run_id) = 1""",
                         [key]).to_pylist()
    out: dict[str, dict[tuple[int, int], set[str]]] = {}
    for r in rows:
        token = _norm_token(r["token_text"])
        if token:
            out.setdefault(r["kind"], {}).setdefault((r["layer"], r["head"]), set()).add(token)
    return out


def _all_heads(model: dict[str, Any]) -> list[tuple[int, int]]:
    return [(layer, head) for layer in range(model["n_layers"]) for head in range(model["n_heads"])]


class Matcher:
    """Precomputes both models' rank profiles and token sets, then answers per head of A."""

    def __init__(self, atlas: Atlas, model_a: str, model_b: str) -> None:
        self.a, self.b = _model(atlas, model_a), _model(atlas, model_b)
        fa, fb = _features(atlas, self.a["model_key"]), _features(atlas, self.b["model_key"])
        self.features = sorted(set(fa) & set(fb))
        self.groups = family_groups(self.features)
        self.heads_a, self.heads_b = _all_heads(self.a), _all_heads(self.b)
        self.pa = _profile_matrix(fa, self.features, self.heads_a)
        self.pb = _profile_matrix(fb, self.features, self.heads_b)
        ta, tb = _token_sets(atlas, self.a["model_key"]), _token_sets(atlas, self.b["model_key"])
        self.kinds = sorted(set(ta) & set(tb))
        self.ta, self.tb = ta, tb
        if not self.features and not self.kinds:
            raise NotFound(f"{self.a['alias'] or self.a['model_key']} and {self.b['alias'] or self.b['model_key']} "
                           "share no metric, concept or lens readout to compare heads by",
                           "build the same families for both models")

    def profile(self, i: int) -> np.ndarray:
        """Similarity of A's head i to every head of B by rank profile: (n_heads_b,), NaN if no features."""
        if not self.features:
            return np.full(len(self.heads_b), np.nan)
        diff = np.abs(self.pb - self.pa[i][None, :])  # (n_b, n_features)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a family with no value for a head: left out
            per_family = np.stack([np.nanmean(diff[:, cols], axis=1) for cols in self.groups.values()], axis=1)
            return 1.0 - np.nanmean(per_family, axis=1)

    def tokens(self, i: int) -> tuple[np.ndarray, list[list[str]]]:
        """Mean Jaccard overlap over shared kinds: (n_heads_b,), and the shared tokens per B head."""
        head = self.heads_a[i]
        sims = np.zeros(len(self.heads_b))
        shared: list[list[str]] = [[] for _ in self.heads_b]
        if not self.kinds:
            return np.full(len(self.heads_b), np.nan), shared
        for kind in self.kinds:
            mine = self.ta[kind].get(head, set())
            for j, other_head in enumerate(self.heads_b):
                theirs = self.tb[kind].get(other_head, set())
                union = mine | theirs
                both = mine & theirs
                sims[j] += len(both) / len(union) if union else 0.0
                shared[j].extend(sorted(both))
        return sims / len(self.kinds), shared

    def match(self, layer: int, head: int, top: int = 10, by: str = "both") -> list[dict[str, Any]]:
        if by not in BY:
            raise BadInput(f"--by must be one of {', '.join(BY)}, not '{by}'", "e.g. --by profile")
        if (layer, head) not in self.heads_a:
            raise NotFound(f"{self.a['alias'] or self.a['model_key']} has no head {layer}.{head}",
                           f"layers 0..{self.a['n_layers'] - 1}, heads 0..{self.a['n_heads'] - 1}")
        i = self.heads_a.index((layer, head))
        prof = self.profile(i)
        tok, shared = self.tokens(i)
        score = _combine(prof, tok, by)
        if np.all(np.isnan(score)):
            raise NotFound(f"no {by} similarity available between these models",
                           "use --by profile (metrics) or build a lens family for --by tokens")
        order = np.lexsort((np.arange(len(score)), -np.nan_to_num(score, nan=-np.inf)))[:top]
        b = self.b
        rows = []
        for rank, j in enumerate(order, start=1):
            lb, hb = self.heads_b[j]
            rows.append({"rank": rank, "model": b["alias"] or b["model_key"], "layer": lb, "head": hb,
                         "kv_head": hb // b["group"], "depth": round(_depth(lb, b["n_layers"]), 3),
                         "score": _num(score[j]), "profile": _num(prof[j]), "tokens": _num(tok[j]),
                         "shared_tokens": " ".join(shared[j][:8]), "n_features": len(self.features)})
        return rows


def _depth(layer: int, n_layers: int) -> float:
    return layer / (n_layers - 1) if n_layers > 1 else 0.0


def _num(x: float) -> float | None:
    return None if np.isnan(x) else round(float(x), 4)


def _combine(prof: np.ndarray, tok: np.ndarray, by: str) -> np.ndarray:
    if by == "profile":
        return prof
    if by == "tokens":
        return tok
    present = [x for x in (prof, tok) if not np.all(np.isnan(x))]
    if len(present) < 2:  # one view only: its own scale
        return present[0] if present else prof
    return np.mean(np.stack([percentiles(x) for x in present]), axis=0)


def match_head(atlas: Atlas, model_a: str, head: str, model_b: str, top: int = 10, by: str = "both") -> pa.Table:
    """`atlas match llama 18.6 --in gemma`: model B's heads most like one head of model A."""
    layer, h = parse_head(head)
    return pa.Table.from_pylist(Matcher(atlas, model_a, model_b).match(layer, h, top, by))


def match_all(atlas: Atlas, model_a: str, model_b: str, top: int = 1, by: str = "both") -> pa.Table:
    """Every head of model A with its `top` best matches in model B."""
    matcher = Matcher(atlas, model_a, model_b)
    a = matcher.a
    rows = []
    for layer, head in matcher.heads_a:
        for row in matcher.match(layer, head, top, by):
            rows.append({"layer_a": layer, "head_a": head, "kv_head_a": head // a["group"],
                         "depth_a": round(_depth(layer, a["n_layers"]), 3), **row})
    return pa.Table.from_pylist(rows)
