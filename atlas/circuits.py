"""Do weight-only circuit scores predict what the pattern, retrieval and ablation families measured?

For each (predictor, target) pair in PREDICTIONS, over one model's heads that have both numbers:

- `spearman`: rank correlation over heads;
- `top_k_target`: the mean target of the k heads with the highest predictor, against `random_target`,
  the mean over `draws` layer-matched random sets (each top head swapped for a random head of its own
  layer, outside the top set): weight scores are strongly layer-dependent, so a set drawn from any layer
  would compare depth, not the score; `p_top` = share of draws whose mean reaches the top set's;
- `labelled`: heads whose target clears its role threshold (atlas.schema.DEFAULT_THRESHOLDS, e.g.
  induction > 0.4, retrieval > 0.1), their mean predictor `labelled_predictor` against the same
  layer-matched random sets (`random_predictor`, `p_labelled`).

Elhage et al. (2021) and Olsson et al. (2022) predict: induction heads copy (high OV copying score) and
K-compose with an earlier previous-token head; previous-token heads are the writers of that K-composition.
Torch-free: reads the atlas only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from atlas.errors import NotFound
from atlas.queries import resolve_model_key
from atlas.schema import DEFAULT_THRESHOLDS
from atlas.store import Atlas

PREDICTIONS: tuple[tuple[str, str], ...] = (
    ("circuits.copying", "patterns.induction"),
    ("circuits.copying", "retrieval.score"),
    ("circuits.copying", "ablation.induction_loss"),
    ("circuits.k_comp_max", "patterns.induction"),
    ("circuits.k_comp_out_max", "patterns.prev_token"),
    ("circuits.copying", "lens.direct_effect"),
)

THRESHOLDS = {metric: threshold for metric, threshold, _label, _why in DEFAULT_THRESHOLDS}


def _values(atlas: Atlas, model_key: str, metric: str) -> dict[tuple[int, int], float]:
    rows = atlas.con.execute("SELECT layer, head, value FROM latest_metrics WHERE model_key = ? AND metric = ?",
                             [model_key, metric]).fetchall()
    return {(int(layer), int(head)): float(value) for layer, head, value in rows}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share), for Spearman's rho."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(_ranks(x), _ranks(y))[0, 1])


def layer_matched_means(heads: list[tuple[int, int]], chosen: list[int], values: np.ndarray, draws: int,
                        rng: np.random.Generator) -> np.ndarray:
    """Mean of `values` over `draws` random sets, each chosen head replaced by a random head of its layer
    (outside the chosen set where the layer has one)."""
    by_layer: dict[int, list[int]] = {}
    taken = set(chosen)
    for i, (layer, _) in enumerate(heads):
        by_layer.setdefault(layer, []).append(i)
    pools = []
    for i in chosen:
        layer_heads = by_layer[heads[i][0]]
        pools.append(np.array([j for j in layer_heads if j not in taken] or layer_heads))
    picks = np.stack([pool[rng.integers(0, len(pool), draws)] for pool in pools], axis=1)  # (draws, chosen)
    return values[picks].mean(1)


def circuit_predictions(atlas: Atlas, model: str, k: int = 10, draws: int = 1000, seed: int = 0,
                        pairs: tuple[tuple[str, str], ...] = PREDICTIONS) -> list[dict[str, Any]]:
    """One row per (predictor, target) pair both measured for `model` (see the module docstring).

    Raises NotFound when the model has no circuits metrics (build `--families circuits` first)."""
    model_key = resolve_model_key(atlas, model)
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    cache: dict[str, dict[tuple[int, int], float]] = {}

    def get(metric: str) -> dict[tuple[int, int], float]:
        if metric not in cache:
            cache[metric] = _values(atlas, model_key, metric)
        return cache[metric]

    if not any(get(p) for p, _ in pairs):
        raise NotFound(f"no circuits metrics for {model} in {atlas.path}",
                       f"run: atlas build --model {model} --families circuits")
    for predictor, target in pairs:
        p, t = get(predictor), get(target)
        heads = sorted(set(p) & set(t))
        if len(heads) < 3:
            continue
        x = np.array([p[h] for h in heads])
        y = np.array([t[h] for h in heads])
        kk = min(k, len(heads) - 1)
        top = [int(i) for i in np.argsort(-x, kind="stable")[:kk]]
        random_top = layer_matched_means(heads, top, y, draws, rng)
        row: dict[str, Any] = {
            "predictor": predictor, "target": target, "heads": len(heads), "spearman": spearman(x, y), "k": kk,
            "top_k_target": float(y[top].mean()), "random_target": float(random_top.mean()),
            "p_top": float((random_top >= y[top].mean()).mean()),
            "top_heads": [list(heads[i]) for i in top]}
        threshold = THRESHOLDS.get(target)
        labelled = [i for i in range(len(heads)) if threshold is not None and y[i] > threshold]
        if labelled:
            random_labelled = layer_matched_means(heads, labelled, x, draws, rng)
            row.update({"threshold": threshold, "labelled": len(labelled),
                        "labelled_predictor": float(x[labelled].mean()),
                        "random_predictor": float(random_labelled.mean()),
                        "p_labelled": float((random_labelled >= x[labelled].mean()).mean())})
        out.append(row)
    return out
