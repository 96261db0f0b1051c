"""Which heads push a given token: a read of the lens family's stored readouts (no model needed).

Tokens are matched per model on the model's own decoded token text, so " Paris" finds each model's
" Paris" token, whatever its id. Only the top `top_k` tokens per head are stored (lens family,
default 50), so heads that push the token less than that are not listed. A word that is several
tokens for a model matches no single stored token and gets a clear error (query one of its pieces).
"""

from __future__ import annotations

import pyarrow as pa
import sqlalchemy as sa

from atlas import schema
from atlas.errors import NotFound
from atlas.queries import resolve_model_key
from atlas.schema import heads_view
from atlas.store import Atlas

runs, models, tokens = schema.runs, schema.models, schema.head_tokens


def variants(token: str) -> list[str]:
    """The text as given first, then with / without one leading space (how BPE vocabularies spell words)."""
    out = [token]
    for alt in (token.strip(), " " + token.strip()):
        if alt and alt not in out:
            out.append(alt)
    return out


def rank_promoters(atlas: Atlas, token: str, model: str | None = None, top: int = 10,
                   kind: str = "promote") -> pa.Table:
    """Heads whose readout of `kind` lists `token`, best score first, per model (latest complete run)."""
    texts = variants(token)
    exact = sa.case(*((tokens.c.token_text == t, i) for i, t in enumerate(texts)), else_=len(texts))
    newest = sa.func.dense_rank().over(partition_by=tokens.c.model_key,
                                       order_by=runs.c.finished_at.desc()).label("newest")
    stmt = (sa.select(tokens.c.model_key, tokens.c.layer, tokens.c.head, tokens.c.token_text.label("matched"),
                      tokens.c.token_id, tokens.c.score, tokens.c.rank.label("token_rank"), exact.label("variant"),
                      newest)
            .select_from(tokens.join(runs, runs.c.run_id == tokens.c.run_id))
            .where(runs.c.status == "complete", tokens.c.kind == kind, tokens.c.token_text.in_(texts)))
    if model:
        stmt = stmt.where(tokens.c.model_key == resolve_model_key(atlas, model))
    found = stmt.subquery()
    # per model: the first spelling that matches at all, then heads by score
    best = sa.func.min(found.c.variant).over(partition_by=found.c.model_key)
    chosen = sa.select(found, best.label("best")).where(found.c.newest == 1).subquery()
    ranked = sa.select(chosen, sa.func.rank().over(partition_by=chosen.c.model_key,
                                                   order_by=chosen.c.score.desc()).label("rank")) \
        .where(chosen.c.variant == chosen.c.best).subquery()
    final = (sa.select(models.c.alias.label("model"), ranked.c.layer, ranked.c.head, heads_view.c.kv_head,
                       sa.func.round(heads_view.c.depth, 3).label("depth"), ranked.c.matched, ranked.c.token_id,
                       ranked.c.score, ranked.c.token_rank, ranked.c.rank, ranked.c.model_key)
             .select_from(ranked.join(models, models.c.model_key == ranked.c.model_key)
                          .join(heads_view, sa.and_(heads_view.c.model_key == ranked.c.model_key,
                                                    heads_view.c.layer == ranked.c.layer,
                                                    heads_view.c.head == ranked.c.head)))
             .where(ranked.c.rank <= top)
             .order_by(ranked.c.model_key, ranked.c.rank, ranked.c.layer, ranked.c.head))
    table = atlas.execute(final)
    if table.num_rows == 0:
        stored = atlas.execute(sa.select(sa.func.max(tokens.c.rank)).where(tokens.c.kind == kind)).column(0)[0]
        if stored.as_py() is None:
            raise NotFound(f"no '{kind}' token readouts in {atlas.path}",
                           "build them with `atlas build --model llama --families lens`")
        raise NotFound(f"no head has {token!r} (or {', '.join(map(repr, texts[1:])) or 'a variant'}) among its "
                       f"top {stored.as_py()} '{kind}' tokens",
                       "it may be several tokens for this model (the atlas stores single tokens; query one "
                       "piece), or no head pushes it on average over the corpus")
    return table
