"""A small Python API for notebooks: `atlas.open(path).heads(metric="induction")` -> pandas.

`Notebook` is a read-only `Atlas` (so `.query(sql)` still returns Arrow) with methods that answer
the common questions in one call. Every method returns a pandas DataFrame, or a pyarrow Table
with `arrow=True`. Imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlas.store import Atlas

if TYPE_CHECKING:  # `import atlas` stays light: the query modules load on first use
    import pyarrow as pa

# report.TOP_K, without importing the report module (numpy, jinja) when the package is imported
REPORT_TOP_K = 5


def _out(table: pa.Table, arrow: bool) -> Any:
    return table if arrow else table.to_pandas()


class Notebook(Atlas):
    """A read-only atlas with notebook-friendly helpers."""

    def heads(self, metric: str | None = None, model: str | None = None, top: int | None = None,
              ascending: bool = False, arrow: bool = False) -> Any:
        """One metric for every head (ranked, with kv_head and depth), or the wide head_roles view."""
        from atlas import queries

        if metric is None:
            sql = "SELECT * FROM head_roles"
            params: list[Any] = []
            if model:
                sql += " WHERE model_key = ?"
                params.append(queries.resolve_model_key(self, model))
            return _out(self.execute(sql + " ORDER BY model_key, layer, head", params), arrow)
        n = top if top is not None else 1 << 30
        return _out(queries.rank_heads(self, metric, model, n, ascending), arrow)

    def models(self, arrow: bool = False) -> Any:
        from atlas import queries

        return _out(queries.list_models(self), arrow)

    def metrics(self) -> list[str]:
        return [row[0] for row in self.metric_ids()]

    def runs(self, model: str | None = None, arrow: bool = False) -> Any:
        from atlas import queries

        sql, params = "SELECT * FROM runs", []
        if model:
            sql += " WHERE model_key = ?"
            params.append(queries.resolve_model_key(self, model))
        return _out(self.execute(sql + " ORDER BY model_key, family, finished_at", params), arrow)

    def concepts(self, concept: str | None = None, model: str | None = None, top: int | None = None,
                 arrow: bool = False) -> Any:
        """Concept scores per head (latest complete run), best first within each model and concept."""
        from atlas import queries

        where, params = ["r.status = 'complete'"], []
        if concept:
            where.append("cs.concept = ?")
            params.append(concept)
        if model:
            where.append("cs.model_key = ?")
            params.append(queries.resolve_model_key(self, model))
        sql = f"""SELECT m.alias AS model, cs.concept, cs.layer, cs.head, h.kv_head, h.depth, cs.score, cs.rank,
                         cs.run_id, cs.model_key
                  FROM concept_scores cs JOIN runs r USING (run_id) JOIN models m USING (model_key)
                  JOIN heads h USING (model_key, layer, head)
                  WHERE {' AND '.join(where)}
                  QUALIFY row_number() OVER (PARTITION BY cs.model_key, cs.concept, cs.layer, cs.head
                                             ORDER BY r.finished_at DESC) = 1"""
        if top is not None:
            sql = f"SELECT * FROM ({sql}) WHERE rank <= {int(top)}"
        return _out(self.execute(f"SELECT * FROM ({sql}) ORDER BY model_key, concept, rank", params), arrow)

    def tokens(self, model: str, layer: int, head: int, arrow: bool = False) -> Any:
        """A head's lens readouts (head_tokens), every kind and run."""
        from atlas import queries

        key = queries.resolve_model_key(self, model)
        return _out(self.execute("SELECT * FROM head_tokens WHERE model_key = ? AND layer = ? AND head = ? "
                                 "ORDER BY run_id, kind, rank", [key, layer, head]), arrow)

    def compare(self, *models: str, metrics: list[str] | None = None, concepts: list[str] | None = None,
                thresholds: dict[str, float] | None = None, top: int = REPORT_TOP_K,
                out: str | Path | None = None) -> dict[str, Any]:
        """The comparison data (and the HTML report when `out` is given)."""
        from atlas import report

        data = report.compare(self, list(models) or None, metrics, concepts, thresholds, top)
        if out is not None:
            report.write_report(data, out)
        return data

    def match(self, model: str, head: str, in_: str, top: int = 10, by: str = "both", arrow: bool = False) -> Any:
        """Heads of model `in_` most like `head` ("18.6") of `model`."""
        from atlas import match

        return _out(match.match_head(self, model, head, in_, top, by), arrow)

    def export(self, out: str | Path, format: str = "parquet", models: list[str] | None = None,
               overwrite: bool = False) -> Any:
        from atlas import export

        if format == "headvis":
            return export.export_headvis(self, out, models, overwrite=overwrite)
        return export.export_parquet(self, out, models, overwrite=overwrite)


def open(path: str | Path, *, wait_s: float = 10.0) -> Notebook:
    """Notebook entry point: `atlas.open("atlas.duckdb").heads(metric="induction")`."""
    return Notebook(path, read_only=True, wait_s=wait_s)
