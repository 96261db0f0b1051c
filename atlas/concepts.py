"""Concept questions of an atlas: which heads specialize in a concept, in one model or across models,
and what the editing check (Head Pursuit, arXiv 2510.21518) found. Read-only; no torch."""

from __future__ import annotations

import pyarrow as pa
import sqlalchemy as sa

from atlas import schema
from atlas.errors import NotFound
from atlas.queries import resolve_model_key
from atlas.schema import heads_view
from atlas.store import Atlas

scores = schema.concept_scores
runs = schema.runs
models = schema.models


def _latest_runs(model_key: str | None = None) -> sa.Subquery:
    """The latest complete pursuit run per model (a re-run with another config supersedes it)."""
    rank = sa.func.row_number().over(partition_by=runs.c.model_key, order_by=runs.c.finished_at.desc())
    stmt = sa.select(runs.c.run_id, runs.c.model_key, rank.label("n")).where(
        runs.c.family == "pursuit", runs.c.status == "complete")
    if model_key:
        stmt = stmt.where(runs.c.model_key == model_key)
    sub = stmt.subquery()
    return sa.select(sub.c.run_id, sub.c.model_key).where(sub.c.n == 1).subquery()


def known_concepts(atlas: Atlas) -> list[str]:
    latest = _latest_runs()
    stmt = sa.select(scores.c.concept).distinct().join(latest, latest.c.run_id == scores.c.run_id)
    return sorted(atlas.execute(stmt).column(0).to_pylist())


def _check_concept(atlas: Atlas, concept: str) -> None:
    known = known_concepts(atlas)
    if concept not in known:
        raise NotFound(f"no concept '{concept}' in {atlas.path}",
                       f"concepts in this atlas: {', '.join(known) or 'none yet'}; "
                       f"build them with `atlas build --families pursuit --concepts {concept}`")


def concept_heads(atlas: Atlas, concept: str, model: str | None = None, top: int = 10) -> pa.Table:
    """Heads ranked for a concept, per model (rank 1 = most specialized; score = the run's ranking
    score, EVR minus a random-dictionary control by default, see the run config)."""
    _check_concept(atlas, concept)
    model_key = resolve_model_key(atlas, model) if model else None
    latest = _latest_runs(model_key)
    stmt = (
        sa.select(models.c.alias.label("model"), scores.c.layer, scores.c.head, heads_view.c.kv_head,
                  sa.func.round(heads_view.c.depth, 3).label("depth"), scores.c.concept,
                  scores.c.score.label("score"), scores.c.rank, scores.c.model_key)
        .select_from(scores.join(latest, latest.c.run_id == scores.c.run_id)
                     .join(models, models.c.model_key == scores.c.model_key)
                     .join(heads_view, sa.and_(heads_view.c.model_key == scores.c.model_key,
                                               heads_view.c.layer == scores.c.layer,
                                               heads_view.c.head == scores.c.head)))
        .where(scores.c.concept == concept, scores.c.rank <= top)
        .order_by(scores.c.model_key, scores.c.rank)
    )
    return atlas.execute(stmt)


def top_heads(atlas: Atlas, model: str, concept: str, k: int) -> list[tuple[int, int]]:
    """The k heads the atlas ranks highest for a concept in one model, as (layer, head)."""
    table = concept_heads(atlas, concept, model, k)
    if table.num_rows == 0:
        raise NotFound(f"no pursuit scores for '{concept}' on {model} in {atlas.path}",
                       f"build them: atlas build --model {model} --families pursuit --concepts {concept}")
    return list(zip(table.column("layer").to_pylist(), table.column("head").to_pylist(), strict=True))


def concept_across_models(atlas: Atlas, concept: str, top: int = 5) -> pa.Table:
    """One row per model: its top heads for the concept, where they sit, and the editing check.

    `suppress_ratio` is the concept mass after/before inverting the top-k heads (smallest k in the
    run), next to the median ratio for layer-matched random heads and the logit-lens heads.
    """
    ranked = concept_heads(atlas, concept, None, top).to_pylist()
    checks = verification(atlas, concept, metric="concept_mass").to_pylist()
    out = []
    for key in dict.fromkeys(r["model_key"] for r in ranked):
        rows = [r for r in ranked if r["model_key"] == key]
        mine = sorted((c for c in checks if c["model_key"] == key and c["alpha"] < 1), key=lambda c: c["k"])
        first = mine[0] if mine else {}
        out.append({"model": rows[0]["model"], "top_heads": ", ".join(f"L{r['layer']}.H{r['head']}" for r in rows),
                    "top_score": rows[0]["score"], "mean_depth": round(sum(r["depth"] for r in rows) / len(rows), 3),
                    "k": first.get("k"), "suppress_ratio": first.get("pursuit"),
                    "random_median": first.get("random_median"), "logit_lens": first.get("logit_lens"),
                    "beats_every_random": first.get("beats_every_random"), "model_key": key})
    return pa.Table.from_pylist(out)


def verification(atlas: Atlas, concept: str | None = None, model: str | None = None,
                 metric: str | None = None) -> pa.Table:
    """The editing check per (model, concept, k, alpha, metric): after/before ratios of the pursuit
    heads, the logit-lens heads and the layer-matched random sets (median, IQR, range)."""
    model_key = resolve_model_key(atlas, model) if model else None
    latest = _latest_runs(model_key)
    edits = schema.edits
    ratio = sa.case((edits.c.before != 0, edits.c.after / edits.c.before), else_=None)
    base = (sa.select(edits.c.model_key, edits.c.concept, edits.c.k, edits.c.alpha, edits.c.metric,
                      edits.c.selection, edits.c.before, ratio.label("ratio"))
            .join(latest, latest.c.run_id == edits.c.run_id))
    if concept:
        base = base.where(edits.c.concept == concept)
    if metric:
        base = base.where(edits.c.metric == metric)
    b = base.subquery()
    is_random = b.c.selection.startswith("random-")
    rnd = sa.case((is_random, b.c.ratio), else_=None)

    def pick(name: str) -> sa.ColumnElement:
        return sa.func.max(sa.case((b.c.selection == name, b.c.ratio), else_=None))

    stmt = (sa.select(models.c.alias.label("model"), b.c.concept, b.c.k, b.c.alpha, b.c.metric,
                      sa.func.max(b.c.before).label("before"), pick("pursuit").label("pursuit"),
                      pick("logit-lens").label("logit_lens"),
                      sa.func.median(rnd).label("random_median"),
                      sa.func.quantile_cont(rnd, 0.25).label("random_q1"),
                      sa.func.quantile_cont(rnd, 0.75).label("random_q3"),
                      sa.func.min(rnd).label("random_min"), sa.func.max(rnd).label("random_max"),
                      b.c.model_key)
            .join(models, models.c.model_key == b.c.model_key)
            .group_by(models.c.alias, b.c.model_key, b.c.concept, b.c.k, b.c.alpha, b.c.metric)
            .order_by(b.c.model_key, b.c.concept, b.c.metric, b.c.k, b.c.alpha))
    table = atlas.execute(stmt)
    lower = [(a < 1) for a in table.column("alpha").to_pylist()]
    beats = [None if m == "corpus_loss" or p is None or lo is None else (p < lo if low else p > hi)
             for m, p, lo, hi, low in zip(table.column("metric").to_pylist(), table.column("pursuit").to_pylist(),
                                          table.column("random_min").to_pylist(),
                                          table.column("random_max").to_pylist(), lower, strict=True)]
    return table.append_column("beats_every_random", pa.array(beats, pa.bool_()))
