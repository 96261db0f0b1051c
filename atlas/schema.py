"""The atlas schema: explicit SQLAlchemy Core tables (no reflection), views, and its version.

Tidy long tables keyed by model/layer/head with provenance in `runs`; wide views for people.
DDL is compiled with the PostgreSQL dialect, which DuckDB speaks for everything used here.
"""

from __future__ import annotations

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateTable

SCHEMA_VERSION = 3
# Version 1 had no derived tables; version 2 had no model_ids, no model_id column in latest_head_metrics,
# no latest_head_tokens / latest_concept_scores and no head_examples. A writer migrates such a file on open
# (Atlas._migrate: the derived tables are recomputed from the history, the added tables created empty), a
# reader answers from per-query views over the history and sees the added tables as empty TEMP tables
# (Atlas._compat_views, ADDED_IN).
READABLE_VERSIONS = (1, 2, 3)
DIALECT = postgresql.dialect(paramstyle="qmark")

metadata = sa.MetaData()


def _head_key() -> list[sa.Column]:
    return [
        sa.Column("run_id", sa.String, primary_key=True),
        sa.Column("model_key", sa.String, nullable=False),
        sa.Column("layer", sa.Integer, primary_key=True),
        sa.Column("head", sa.Integer, primary_key=True),
    ]


atlas_meta = sa.Table(
    "atlas_meta",
    metadata,
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("value", sa.String, nullable=False),
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("model_key", sa.String, primary_key=True),
    sa.Column("alias", sa.String),
    sa.Column("source", sa.String, nullable=False),
    sa.Column("revision", sa.String),
    sa.Column("file_hash", sa.String),
    sa.Column("format", sa.String, nullable=False),
    sa.Column("quantization", sa.String),
    sa.Column("dtype", sa.String, nullable=False),
    sa.Column("architecture", sa.String, nullable=False),
    sa.Column("n_layers", sa.Integer, nullable=False),
    sa.Column("n_heads", sa.Integer, nullable=False),
    sa.Column("n_kv_heads", sa.Integer, nullable=False),
    sa.Column("d_model", sa.Integer, nullable=False),
    sa.Column("d_head", sa.Integer, nullable=False),
    sa.Column("vocab_size", sa.Integer, nullable=False),
    sa.Column("added_at", sa.DateTime(timezone=True)),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", sa.String, primary_key=True),
    sa.Column("model_key", sa.String, nullable=False),
    sa.Column("family", sa.String, nullable=False),
    sa.Column("family_version", sa.Integer, nullable=False),
    sa.Column("probe_set", sa.String, nullable=False),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("config_hash", sa.String, nullable=False),
    sa.Column("code_version", sa.String, nullable=False),
    sa.Column("device", sa.String),
    sa.Column("tokens", sa.BigInteger),
    sa.Column("seconds", sa.Double),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("error", sa.String),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
)

head_metrics = sa.Table(
    "head_metrics",
    metadata,
    *_head_key(),
    sa.Column("metric", sa.String, primary_key=True),
    sa.Column("value", sa.Double, nullable=False),  # DOUBLE, not REAL: sa.Float would be 32-bit here
    sa.Column("n", sa.BigInteger),
    sa.Column("stderr", sa.Double),
)

head_tokens = sa.Table(
    "head_tokens",
    metadata,
    *_head_key(),
    sa.Column("kind", sa.String, primary_key=True),  # promote / suppress / lens / pursuit ...
    sa.Column("rank", sa.Integer, primary_key=True),
    sa.Column("token_id", sa.BigInteger, nullable=False),
    sa.Column("token_text", sa.String, nullable=False),
    sa.Column("score", sa.Double, nullable=False),
)

concepts = sa.Table(
    "concepts",
    metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("words", sa.JSON, nullable=False),
    sa.Column("source", sa.String, nullable=False),
)

concept_scores = sa.Table(
    "concept_scores",
    metadata,
    *_head_key(),
    sa.Column("concept", sa.String, primary_key=True),
    sa.Column("score", sa.Double, nullable=False),
    sa.Column("rank", sa.Integer, nullable=False),
)

edits = sa.Table(
    "edits",
    metadata,
    sa.Column("run_id", sa.String, primary_key=True),
    sa.Column("edit_id", sa.String, primary_key=True),
    sa.Column("model_key", sa.String, nullable=False),
    sa.Column("concept", sa.String),
    sa.Column("k", sa.Integer, nullable=False),
    sa.Column("alpha", sa.Double, nullable=False),
    sa.Column("selection", sa.String, nullable=False),  # pursuit / logit-lens / random seed n
    sa.Column("heads", sa.JSON, nullable=False),
    sa.Column("metric", sa.String, nullable=False),
    sa.Column("before", sa.Double),
    sa.Column("after", sa.Double),
)

run_metrics = sa.Table(  # run-level numbers: method agreement, masking checks, grids
    "run_metrics",
    metadata,
    sa.Column("run_id", sa.String, primary_key=True),
    sa.Column("metric", sa.String, primary_key=True),
    sa.Column("value", sa.Double),
    sa.Column("detail", sa.JSON),
)

head_examples = sa.Table(  # example contexts per head (workers/families/examples.py), top-k per criterion
    "head_examples",
    metadata,
    *_head_key(),
    sa.Column("criterion", sa.String, primary_key=True),  # max_attention / max_write
    sa.Column("rank", sa.Integer, primary_key=True),  # 1 = highest score
    sa.Column("score", sa.Double, nullable=False),
    sa.Column("tokens", sa.JSON, nullable=False),  # token texts, each decoded on its own
    sa.Column("token_ids", sa.JSON, nullable=False),
    sa.Column("query_pos", sa.Integer, nullable=False),  # index of the query token in `tokens`
    sa.Column("attention", sa.JSON, nullable=False),  # the head's attention row at the query, one per token
    sa.Column("source_window", sa.BigInteger),  # which corpus window, and where in it the query sat
    sa.Column("source_pos", sa.Integer),
)

role_thresholds = sa.Table(
    "role_thresholds",
    metadata,
    sa.Column("metric", sa.String, primary_key=True),
    sa.Column("threshold", sa.Double, nullable=False),
    sa.Column("label", sa.String, nullable=False),
    sa.Column("source", sa.String, nullable=False),
)

# The `heads` view for SQLAlchemy statements (atlas.concepts, atlas.lens_queries)
heads_view = sa.table("heads", sa.column("model_key"), sa.column("alias"), sa.column("layer"),
                      sa.column("head"), sa.column("kv_head"), sa.column("depth"))

# Tables a shard may carry, in ingest order; all but `concepts` are keyed by run_id.
SHARD_TABLES = ("head_metrics", "head_tokens", "concepts", "concept_scores", "edits", "run_metrics",
                "head_examples")

# Tables a schema version added, by version: a writer creates them when it migrates an older file; a
# read-only handle on an older file sees them as empty TEMP tables, so every query still runs.
ADDED_IN = {3: ("head_examples",)}


def arrow_type(column: sa.Column) -> pa.DataType:
    """The Arrow type a shard stores for a column: the one place SQL types map to Arrow.

    JSON columns travel as JSON text (atlas.shards serialises whatever a family hands in)."""
    kind = column.type
    if isinstance(kind, sa.JSON):
        return pa.string()
    if isinstance(kind, sa.BigInteger):  # before Integer: BigInteger is an Integer
        return pa.int64()
    if isinstance(kind, sa.Integer):
        return pa.int32()
    if isinstance(kind, sa.Double | sa.Float):
        return pa.float64()
    if isinstance(kind, sa.Boolean):
        return pa.bool_()
    if isinstance(kind, sa.DateTime):
        return pa.timestamp("us", tz="UTC") if kind.timezone else pa.timestamp("us")
    if isinstance(kind, sa.String):
        return pa.string()
    raise TypeError(f"no Arrow type for column {column.table.name}.{column.name} of type {kind!r}; "
                    "add it to atlas.schema.arrow_type")


def arrow_schema(table: str | sa.Table) -> pa.Schema:
    """A table's Arrow schema, column for column; a field is non-nullable where the column is NOT NULL."""
    table = metadata.tables[table] if isinstance(table, str) else table
    return pa.schema([pa.field(c.name, arrow_type(c), nullable=bool(c.nullable)) for c in table.columns])

DEFAULT_THRESHOLDS = [
    ("patterns.induction", 0.4, "induction", "ARENA stripe-score label threshold"),
    ("patterns.prev_token", 0.4, "previous-token", "ARENA stripe-score label threshold"),
    ("patterns.duplicate_token", 0.4, "duplicate-token", "ARENA stripe-score label threshold"),
    ("patterns.bos_sink", 0.3, "bos-sink", "Gu et al. arXiv 2410.10781, epsilon = 0.3"),
    ("retrieval.score", 0.1, "retrieval", "Wu et al. arXiv 2404.15574, score > 0.1"),
]

# -- derived tables: what "latest complete run" means, kept by the single writer at ingest --------------
# They are not in `metadata` (no shard carries them, exports skip them): atlas.store fills them from the
# history tables for the (model, metric) pairs an ingest touches, so a read costs what its answer holds,
# not what the atlas has ever stored. `Atlas.rebuild_derived()` recomputes them all from the history.

HEAD_COLUMNS = ("model_key", "alias", "layer", "head", "kv_head", "depth", "n_layers", "n_heads", "n_kv_heads")


def heads_select(models_from: str = "models") -> str:
    """Every head of the models in `models_from` (a table or a subquery aliasing `models`) with kv_head
    and depth: the body of the version 1 `heads` view, kept verbatim so its column types stay."""
    return f"""
        SELECT m.model_key, m.alias, l.layer, h.head,
               h.head // (m.n_heads // m.n_kv_heads) AS kv_head,
               CASE WHEN m.n_layers > 1 THEN l.layer / (m.n_layers - 1) ELSE 0.0 END AS depth,
               m.n_layers, m.n_heads, m.n_kv_heads
        FROM {models_from} m,
             (SELECT model_key, unnest(range(n_layers)) AS layer FROM {models_from}) l,
             (SELECT model_key, unnest(range(n_heads)) AS head FROM {models_from}) h
        WHERE l.model_key = m.model_key AND h.model_key = m.model_key
    """


def latest_select(where: str = "") -> str:
    """The latest complete run's row per (model, metric, layer, head), with the head's rank (1 = highest
    value, SQL rank(): ties share) and the number of heads ranked, within its model and metric.
    `where` filters head_metrics (alias hm) before the window, e.g. to one model's metrics.
    Ties on finished_at go to the larger run_id, so the answer never depends on scan order."""
    return f"""
        SELECT run_id, model_key, layer, head, metric, value, n, stderr,
               rank() OVER (PARTITION BY model_key, metric ORDER BY value DESC) AS rank,
               count(*) OVER (PARTITION BY model_key, metric) AS "of"
        FROM (SELECT hm.* FROM head_metrics hm JOIN runs r USING (run_id)
              WHERE r.status = 'complete' {where}
              QUALIFY row_number() OVER (PARTITION BY hm.model_key, hm.metric, hm.layer, hm.head
                                         ORDER BY r.finished_at DESC, hm.run_id DESC) = 1)
    """


def latest_head_rows_select(table: str, group: str, where: str = "") -> str:
    """A history table's rows (head_tokens per kind, concept_scores per concept) from the newest complete
    run per (model, head, `group`), with the run's family and the model's model_id; `where` filters the
    table (alias t). dense_rank: runs that finished at the same instant both stay, as the card showed them."""
    return f"""
        SELECT t.*, r.family, i.model_id FROM {table} t JOIN runs r ON r.run_id = t.run_id
        JOIN model_ids i ON i.model_key = t.model_key
        WHERE r.status = 'complete' {where}
        QUALIFY dense_rank() OVER (PARTITION BY t.model_key, t.layer, t.head, t.{group}
                                   ORDER BY r.finished_at DESC) = 1
    """


# A head card reads one head's rows: by an INTEGER model_id, because DuckDB's zone maps keep only an 8-byte
# prefix of a string, so `model_key = ?` cannot skip the row groups of models whose keys share one
# ("llama-3.1-..."): a card's lookups on a 100-model atlas took 4-8 ms each by key, 0.7-0.9 ms by id.
DERIVED_TABLES = {
    # a small integer per model, assigned at its first ingest: what the derived tables cluster on
    "model_ids": "CREATE TABLE model_ids (model_key VARCHAR PRIMARY KEY, model_id INTEGER NOT NULL)",
    # the latest value of every (model, metric, head), clustered by model (inserted model by model)
    "latest_head_metrics": """CREATE TABLE latest_head_metrics (
        run_id VARCHAR NOT NULL, model_key VARCHAR NOT NULL, layer INTEGER NOT NULL, head INTEGER NOT NULL,
        metric VARCHAR NOT NULL, value DOUBLE NOT NULL, n BIGINT, stderr DOUBLE,
        rank BIGINT NOT NULL, "of" BIGINT NOT NULL, model_id INTEGER NOT NULL)""",
    # a head's token readouts and concept scores from the newest complete run per kind / concept, ordered
    # by model, layer, head (the card's lookups); the history tables keep every run
    "latest_head_tokens": """CREATE TABLE latest_head_tokens (
        run_id VARCHAR NOT NULL, model_key VARCHAR NOT NULL, layer INTEGER NOT NULL, head INTEGER NOT NULL,
        kind VARCHAR NOT NULL, rank INTEGER NOT NULL, token_id BIGINT NOT NULL, token_text VARCHAR NOT NULL,
        score DOUBLE NOT NULL, family VARCHAR NOT NULL, model_id INTEGER NOT NULL)""",
    "latest_concept_scores": """CREATE TABLE latest_concept_scores (
        run_id VARCHAR NOT NULL, model_key VARCHAR NOT NULL, layer INTEGER NOT NULL, head INTEGER NOT NULL,
        concept VARCHAR NOT NULL, score DOUBLE NOT NULL, rank INTEGER NOT NULL, family VARCHAR NOT NULL,
        model_id INTEGER NOT NULL)""",
    # which metrics / concepts each run stored (and how many rows): small, read instead of the history
    "metric_runs": """CREATE TABLE metric_runs (
        run_id VARCHAR NOT NULL, model_key VARCHAR NOT NULL, metric VARCHAR NOT NULL, rows BIGINT NOT NULL)""",
    "concept_runs": """CREATE TABLE concept_runs (
        run_id VARCHAR NOT NULL, model_key VARCHAR NOT NULL, concept VARCHAR NOT NULL, rows BIGINT NOT NULL)""",
    # every head of every model (the heads view's columns) and one DOUBLE column per metric id
    "head_roles_wide": f"CREATE TABLE head_roles_wide AS {heads_select()} LIMIT 0",
}

VIEWS = {
    # Latest complete run per (model, metric, head): re-running with a new config supersedes, history stays.
    "latest_metrics": "SELECT run_id, model_key, layer, head, metric, value, n, stderr FROM latest_head_metrics",
    "heads": f"SELECT {', '.join(HEAD_COLUMNS)} FROM head_roles_wide",
    "head_labels": """
        SELECT lm.model_key, lm.layer, lm.head, t.label, lm.metric, lm.value, t.threshold
        FROM latest_metrics lm JOIN role_thresholds t USING (metric)
        WHERE lm.value > t.threshold
    """,
}

# Older files opened read-only: the derived tables as views over the history (as version 1 computed
# them on every query), created TEMP on the reader's own connection; nothing is written to the file.
COMPAT_VIEWS = {
    "model_ids": "SELECT model_key, (row_number() OVER (ORDER BY model_key))::INTEGER AS model_id FROM models",
    "latest_head_metrics": f"SELECT l.*, i.model_id FROM ({latest_select()}) l JOIN model_ids i USING (model_key)",
    "latest_head_tokens": latest_head_rows_select("head_tokens", "kind"),
    "latest_concept_scores": latest_head_rows_select("concept_scores", "concept"),
    "metric_runs": "SELECT run_id, any_value(model_key) AS model_key, metric, count(*) AS rows "
                   "FROM head_metrics GROUP BY run_id, metric",
    "concept_runs": "SELECT run_id, any_value(model_key) AS model_key, concept, count(*) AS rows "
                    "FROM concept_scores GROUP BY run_id, concept",
}


def compat_wide(metric_ids: list[str]) -> str:
    """head_roles_wide of a version 1 file read-only: the heads, pivoted latest values beside them."""
    metrics = wide_columns(metric_ids)
    if not metrics:
        return heads_select()
    listed = ", ".join(sql_text(m) for m in metrics)
    return (f"SELECT h.*, p.* EXCLUDE (model_key, layer, head) FROM ({heads_select()}) h LEFT JOIN "
            f"(PIVOT (SELECT model_key, layer, head, metric, value FROM latest_head_metrics) ON metric IN ({listed}) "
            f"USING first(value) GROUP BY model_key, layer, head) p USING (model_key, layer, head)")


def create_statements() -> list[str]:
    return [str(CreateTable(t).compile(dialect=DIALECT)).strip() for t in metadata.sorted_tables]


def added_since(version: int) -> dict[str, str]:
    """{table: CREATE TABLE statement} of the tables added after schema `version` (for migrations)."""
    names = [name for v, tables in ADDED_IN.items() if v > version for name in tables]
    return {n: str(CreateTable(metadata.tables[n]).compile(dialect=DIALECT)).strip() for n in names}


def wide_columns(metric_ids: list[str]) -> list[str]:
    """Metric ids that can be columns of the wide view, sorted (a quote in an id keeps it out)."""
    return sorted(m for m in metric_ids if "'" not in m and '"' not in m)


def head_roles_view(metric_ids: list[str]) -> str:
    """Wide view: one row per head, one column per metric (sorted), read from head_roles_wide."""
    columns = [*HEAD_COLUMNS, *(f'"{m}"' for m in wide_columns(metric_ids))]
    return f"CREATE OR REPLACE VIEW head_roles AS SELECT {', '.join(columns)} FROM head_roles_wide"


def sql_text(value: str) -> str:
    """A SQL string literal (PIVOT takes no parameters): quotes doubled."""
    return "'" + value.replace("'", "''") + "'"
