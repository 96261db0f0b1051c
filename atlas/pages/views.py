"""HTML pages served by `atlas serve`: model overview with heatmaps, head page, concept page, search.

Server-side rendered with Jinja2; styles inline, no scripts from anywhere else, so the pages work
offline. Every number is also in a `data-value` attribute, which the browser test reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, RedirectResponse

from atlas import queries
from atlas.heads import HEAD
from atlas.pages import data
from atlas.pages.data import check_index, check_top, json_safe, rows

TEMPLATES = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                               autoescape=True, undefined=jinja2.StrictUndefined)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def color(value: float | None, lo: float, hi: float) -> str:
    """White (lowest in the grid) to deep blue (highest); grey for a missing value."""
    if value is None:
        return "#eee"
    t = 0.0 if hi <= lo else (value - lo) / (hi - lo)
    r, g, b = (int(255 - t * (255 - c)) for c in (8, 69, 148))
    return f"rgb({r},{g},{b})"


def head_url(model: str, layer: int, head: int) -> str:
    return f"/{quote(model, safe='')}/{layer}/{head}"


TEMPLATES.filters.update(fmt=fmt, q=lambda s: quote(str(s), safe=""))
TEMPLATES.globals.update(head_url=head_url, color=color)


def render(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(TEMPLATES.get_template(template).render(**context), status_code=status)


def add_pages(app: FastAPI, service: Any) -> None:
    """Register the pages; the catch-all model route goes last so /api and /concept win."""

    def page(build: Callable[[Any], HTMLResponse]) -> HTMLResponse:
        # an AtlasError goes to the app's handler: an HTML error page for a browser, JSON otherwise
        with service.reader() as atlas:
            return build(atlas)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return page(lambda atlas: render(
            "index.html", title="head-atlas", models=queries.list_models(atlas).to_pylist(),
            metrics=[r[0] for r in atlas.metric_ids()], concepts=data.list_concepts(atlas).to_pylist(),
            db=service.db.name))  # the file's name, never its path

    @app.get("/search", response_class=HTMLResponse, include_in_schema=False)
    def search(q: str = "") -> Any:
        return page(lambda atlas: _search(atlas, q.strip()))

    @app.get("/concept/{name}", response_class=HTMLResponse, include_in_schema=False)
    def concept(name: str, top: int = 10) -> HTMLResponse:
        def build(atlas: Any) -> HTMLResponse:
            check_top(top, service.max_rows)
            table = data.concept_heads(atlas, name, None, top).to_pylist()
            by_model: dict[str, list[dict[str, Any]]] = {}
            for row in table:
                by_model.setdefault(row["model"], []).append(row)
            return render("concept.html", title=f"concept {name}", concept=name, by_model=by_model,
                          words=data.concept_words(atlas, name), top=top)
        return page(build)

    @app.get("/metric/{metric}", response_class=HTMLResponse, include_in_schema=False)
    def metric(metric: str, top: int = 10) -> HTMLResponse:
        def build(atlas: Any) -> HTMLResponse:
            check_top(top, service.max_rows)
            table = queries.rank_heads(atlas, metric, None, top).to_pylist()
            return render("metric.html", title=f"metric {metric}", metric=table[0]["metric"] if table else metric,
                          rows=table)
        return page(build)

    add_compare(app, service)

    @app.get("/{model:path}/{layer:int}/{head:int}", response_class=HTMLResponse, include_in_schema=False)
    def head(model: str, layer: int, head: int) -> HTMLResponse:
        def build(atlas: Any) -> HTMLResponse:
            check_index(layer, head)
            return render("head.html", title=f"{model} {layer}.{head}", card=data.head_card(atlas, model, layer, head))
        return page(build)

    @app.get("/{model:path}", response_class=HTMLResponse, include_in_schema=False)
    def model(model: str) -> HTMLResponse:
        def build(atlas: Any) -> HTMLResponse:
            row = data.model_row(atlas, model)
            grids = data.heatmaps(atlas, row["model_key"])
            ranges = {}
            for name, grid in grids.items():
                values = [v for line in grid for v in line if v is not None]
                ranges[name] = (min(values), max(values)) if values else (0.0, 0.0)
            return render("model.html", title=row["alias"] or row["model_key"], m=row,
                          name=row["alias"] or row["model_key"], grids=grids, ranges=ranges)
        return page(build)


def add_compare(app: FastAPI, service: Any) -> None:
    """Head matching (atlas/match.py) and cross-model comparison (atlas/report.py), as JSON and as the
    offline comparison report (plotly.js inlined by atlas/report.py, no CDN)."""
    from atlas.match import match_head
    from atlas.report import compare, render_html

    def _compare(atlas: Any, models: list[str] | None, metrics: list[str] | None,
                 concepts: list[str] | None, top: int) -> dict[str, Any]:
        check_top(top, service.max_rows)
        keys = [data.exact_model_key(atlas, m) for m in models or []]
        return compare(atlas, keys or None, metrics or None, concepts or None, top=top)

    @app.get("/api/match/{model:path}/{layer:int}/{head:int}", tags=["compare"],
             summary="Heads of another model most like this head (profile and token views)")
    def match(model: str, layer: int, head: int, other: str = Query(..., alias="in"), top: int = 10,
              by: str = "both") -> list[dict[str, Any]]:
        check_top(top, service.max_rows)
        check_index(layer, head)
        with service.reader() as atlas:
            key, other_key = data.exact_model_key(atlas, model), data.exact_model_key(atlas, other)
            return rows(match_head(atlas, key, f"{layer}.{head}", other_key, top, by))

    @app.get("/api/compare", tags=["compare"], summary="Cross-model comparison: roles, top heads, concepts")
    def compare_json(models: list[str] = Query(default=[]), metrics: list[str] = Query(default=[]),
                     concepts: list[str] = Query(default=[]), top: int = 5) -> dict[str, Any]:
        with service.reader() as atlas:
            return json_safe(_compare(atlas, models, metrics, concepts, top))

    @app.get("/compare", response_class=HTMLResponse, include_in_schema=False)
    def compare_page(models: list[str] = Query(default=[]), metrics: list[str] = Query(default=[]),
                     concepts: list[str] = Query(default=[]), top: int = 5) -> HTMLResponse:
        with service.reader() as atlas:
            return HTMLResponse(render_html(_compare(atlas, models, metrics, concepts, top)))


HEAD_SPEC = re.compile(rf"^(?P<model>.+?)[\s/]+{HEAD}$")  # `llama 3.4`, `llama/3/4`, `llama L3H4`


def _search(atlas: Any, q: str) -> Any:
    """`llama 3.4` or `llama/3/4` opens a head; an exact model, concept or metric opens its page;
    anything else lists what contains the text."""
    if not q:
        return RedirectResponse("/", status_code=303)
    spec = HEAD_SPEC.match(q)
    if spec:
        return RedirectResponse(head_url(spec["model"], int(spec["layer"]), int(spec["head"])), status_code=303)
    models = queries.list_models(atlas).to_pylist()
    metrics = [r[0] for r in atlas.metric_ids()]
    concepts = data.list_concepts(atlas).column("concept").to_pylist()
    needle = q.lower()
    for m in models:
        if needle in ((m["alias"] or "").lower(), m["model_key"].lower()):
            return RedirectResponse("/" + quote(m["alias"] or m["model_key"], safe=""), status_code=303)
    if q in concepts:
        return RedirectResponse(f"/concept/{quote(q, safe='')}", status_code=303)
    exact = [x for x in metrics if needle in (x.lower(), x.split(".", 1)[-1].lower())]
    if len(exact) == 1:
        return RedirectResponse(f"/metric/{quote(exact[0], safe='')}", status_code=303)
    return render("search.html", title=f"search {q}", q=q,
                  models=[m for m in models if needle in f"{m['alias']} {m['model_key']}".lower()],
                  metrics=[x for x in metrics if needle in x.lower()],
                  concepts=[c for c in concepts if needle in c.lower()])
