"""Open an atlas file: one writer (the build driver or the server), many read-only readers.

DuckDB lets one process write, and while it holds the file nobody else can open it, not even
read-only. So writers keep their windows short and both sides retry briefly on a lock, then
say clearly why they could not get in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from atlas.errors import BadInput, Busy, NotFound, SchemaMismatch

if TYPE_CHECKING:  # imported where used: `import atlas` and `atlas --help` load no DuckDB, Arrow,
    import duckdb  # SQLAlchemy or pydantic; a read loads DuckDB and Arrow only
    import pyarrow as pa
    import sqlalchemy as sa

    from atlas.records import RunRecord

LOCK_MARKERS = ("Could not set lock", "Conflicting lock")
SCHEMA_VERSION = 3  # atlas.schema.SCHEMA_VERSION; here too so opening a file needs no SQLAlchemy
READABLE_VERSIONS = (1, 2, 3)


def _connect(path: Path, read_only: bool, wait_s: float) -> duckdb.DuckDBPyConnection:
    import duckdb

    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            if not any(m in str(exc) for m in LOCK_MARKERS):
                raise BadInput(f"cannot open {path} as a DuckDB atlas: {exc}",
                               "pass --db with a head-atlas .duckdb file") from exc
            if time.monotonic() >= deadline:
                raise Busy(
                    f"the atlas {path} is held by another process (a build ingesting, or a server) "
                    f"and did not free up within {wait_s:.0f}s",
                    "retry in a moment; while `atlas serve` runs, query it with --server",
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        except duckdb.Error as exc:
            raise BadInput(f"{path} is not a DuckDB database this version can open: {exc}",
                           "pass --db with a head-atlas .duckdb file written by this version") from exc


class Atlas:
    """A handle on one atlas file. Read-only unless opened with `writer()`."""

    def __init__(self, path: str | Path, *, read_only: bool = True, wait_s: float = 10.0) -> None:
        import duckdb

        self.path = Path(path)
        self.read_only = read_only
        if read_only and not self.path.exists():
            raise NotFound(f"no atlas at {self.path}",
                           "build one with `atlas build --model llama`, or pass --db PATH")
        fresh = not self.path.exists()
        self.con = _connect(self.path, read_only, wait_s)
        try:
            if fresh:
                self._create()
            self._check_version()
        except duckdb.Error as exc:  # a damaged file can open and then fail on its first read
            self.con.close()
            raise BadInput(f"{self.path} is damaged or not an atlas: {_one_line(exc)}",
                           "restore it from a copy, or rebuild it into a new --db") from None
        except Exception:
            self.con.close()
            raise

    @classmethod
    def writer(cls, path: str | Path, wait_s: float = 30.0) -> Atlas:
        return cls(path, read_only=False, wait_s=wait_s)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema ---------------------------------------------------------------------------
    def _create(self) -> None:
        from atlas import schema

        with self.transaction():
            for ddl in schema.create_statements():
                self.con.execute(ddl)
            self.con.execute("INSERT INTO atlas_meta VALUES ('schema_version', ?)",
                             [str(schema.SCHEMA_VERSION)])
            self.con.executemany("INSERT INTO role_thresholds VALUES (?, ?, ?, ?)",
                                 schema.DEFAULT_THRESHOLDS)
            self._create_derived()

    def _create_derived(self) -> None:
        from atlas import schema

        for ddl in schema.DERIVED_TABLES.values():
            self.con.execute(ddl)
        for name, body in schema.VIEWS.items():
            self.con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
        self.con.execute(schema.head_roles_view([]))

    def _check_version(self) -> None:
        import duckdb

        try:
            rows = self.con.execute(
                "SELECT value FROM atlas_meta WHERE key = 'schema_version'").fetchall()
        except duckdb.CatalogException as exc:
            raise SchemaMismatch(f"{self.path} is a DuckDB file but not a head-atlas",
                                 "pass --db with an atlas file, or a new path to create one") from exc
        found = int(rows[0][0]) if rows else -1
        if found not in READABLE_VERSIONS:
            raise SchemaMismatch(
                f"{self.path} has atlas schema version {found}; this head-atlas reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}",
                "export it with the head-atlas version that wrote it, or build into a new --db",
            )
        if found < SCHEMA_VERSION:
            if self.read_only:
                self._compat_views(found)
            else:
                self._migrate(found)

    def _migrate(self, found: int) -> None:
        """Migrate a file of version `found` to this version, in the single writer, in one transaction:
        create the tables later versions added (head_examples), empty; drop the derived tables and views
        (version 1 had none, version 2 had them without model_ids, model_id and the per-head latest tables)
        and derive them again from the history (once; ingests keep them current from then on)."""
        from atlas import schema

        with self.transaction():
            for ddl in schema.added_since(found).values():
                self.con.execute(ddl.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS", 1))
            for name in ("head_roles", "head_labels", "latest_metrics", "heads"):
                self.con.execute(f"DROP VIEW IF EXISTS {name}")
            for name in schema.DERIVED_TABLES:
                self.con.execute(f"DROP TABLE IF EXISTS {name}")
            self._create_derived()
            self._fill_derived()
            self.con.execute("UPDATE atlas_meta SET value = ? WHERE key = 'schema_version'",
                             [str(schema.SCHEMA_VERSION)])

    def _compat_views(self, found: int) -> None:
        """An older file opened read-only, on this connection only, nothing written: the tables later
        versions added as empty TEMP tables, and the derived tables as TEMP views over the history that
        shadow any the file has (as slow as version 1 was; open it once with a writer to migrate it)."""
        from atlas import schema

        existing = {r[0] for r in self.con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        for name, ddl in schema.added_since(found).items():
            if name not in existing:  # never shadow a table the file has
                self.con.execute(ddl.replace("CREATE TABLE", "CREATE TEMP TABLE", 1))
        for name, body in schema.COMPAT_VIEWS.items():
            self.con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {body}")
        metrics = [r[0] for r in self.metric_ids()]
        self.con.execute(f"CREATE OR REPLACE TEMP VIEW head_roles_wide AS {schema.compat_wide(metrics)}")
        for name, body in schema.VIEWS.items():  # shadow the file's own views: answers as version 2 gives them
            self.con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {body}")
        self.con.execute(schema.head_roles_view(metrics).replace("OR REPLACE VIEW", "OR REPLACE TEMP VIEW"))

    def rebuild_derived(self) -> None:
        """Recompute every derived table from the history tables (they are a cache of them)."""
        from atlas import schema

        self._require_writer()
        with self.transaction():
            for name in schema.DERIVED_TABLES:
                self.con.execute(f"DROP TABLE {name}")
            self._create_derived()
            self._fill_derived()

    def _fill_derived(self) -> None:
        from atlas import schema

        self.con.execute("INSERT INTO metric_runs SELECT run_id, any_value(model_key), metric, count(*) "
                         "FROM head_metrics GROUP BY run_id, metric ORDER BY run_id, metric")
        self.con.execute("INSERT INTO concept_runs SELECT run_id, any_value(model_key), concept, count(*) "
                         "FROM concept_scores GROUP BY run_id, concept ORDER BY run_id, concept")
        self.con.execute("INSERT INTO model_ids SELECT model_key, row_number() OVER (ORDER BY model_key) "
                         "FROM models ORDER BY model_key")
        self.con.execute(f"INSERT INTO latest_head_metrics BY NAME SELECT l.*, i.model_id "
                         f"FROM ({schema.latest_select()}) l JOIN model_ids i USING (model_key) "
                         "ORDER BY model_id, metric, layer, head")
        for table in LATEST_HEAD_ROWS:
            self._refresh_head_rows(table, None)
        self._refresh_wide(None)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    # -- reads ----------------------------------------------------------------------------
    def execute(self, stmt: sa.sql.ClauseElement | str, params: Sequence[Any] = ()) -> pa.Table:
        """Run a SQLAlchemy Core statement (or trusted SQL text) and return Arrow."""
        if isinstance(stmt, str):
            return self._arrow(stmt, list(params))
        from sqlalchemy.sql.compiler import SQLCompiler

        from atlas import schema

        compiled = stmt.compile(dialect=schema.DIALECT, compile_kwargs={"render_postcompile": True})
        assert isinstance(compiled, SQLCompiler)  # a statement, not DDL: it has positional parameters
        values = [compiled.params[name] for name in (compiled.positiontup or [])]
        return self._arrow(str(compiled), values)

    def _arrow(self, sql: str, params: list[Any]) -> pa.Table:
        import pyarrow as pa

        relation = self.con.sql(sql, params=params or None)
        return relation.to_arrow_table() if relation is not None else pa.table({})

    def query(self, sql: str) -> pa.Table:
        """Run user SQL: a single read statement, never a write, on a read-only connection."""
        import duckdb

        try:
            statements = self.con.extract_statements(sql)
        except duckdb.Error as exc:
            raise BadInput(f"the SQL does not parse: {exc}", "check the statement") from exc
        if len(statements) != 1:
            raise BadInput(f"expected one SQL statement, got {len(statements)}",
                           "send one SELECT at a time")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            raise BadInput(f"only read queries are allowed here, not {kind.name}",
                           "atlas query is read-only; the build writes the atlas")
        try:
            return self._arrow(sql, [])
        except duckdb.Error as exc:
            raise BadInput(f"the query failed: {exc}", "see `atlas query --help` for the schema") from exc

    def completed_runs(self, run_ids: Sequence[str]) -> set[str]:
        if not run_ids:
            return set()
        found = self.con.execute("SELECT run_id FROM runs WHERE status = 'complete' AND list_contains(?, run_id)",
                                 [list(run_ids)]).fetchall()
        return {row[0] for row in found}

    def metric_ids(self) -> list[tuple[str]]:
        """Rows of one column: every metric id in head_metrics, sorted (from the small metric_runs index)."""
        return self.con.execute("SELECT DISTINCT metric FROM metric_runs ORDER BY 1").fetchall()

    # -- writes ---------------------------------------------------------------------------
    def _require_writer(self) -> None:
        if self.read_only:
            raise BadInput("this atlas handle is read-only", "open it with Atlas.writer(path)")

    def _replace_row(self, table: sa.Table, row: dict[str, Any]) -> None:
        values = {c.name: _to_sql(c, row.get(c.name)) for c in table.columns}
        key = list(table.primary_key.columns)
        self.execute(table.delete().where(*[c == values[c.name] for c in key]))
        self.execute(table.insert().values(**values))

    def ingest(self, shard_dir: str | Path) -> int:
        """Ingest one finished shard in one short transaction; idempotent on its run_id.

        The Parquet files are read here, in Python (pyarrow), and handed to DuckDB as Arrow: the
        server's DuckDB instance has no file access at all (see `sandbox`), and the ingest is
        the same with or without a server. The derived tables are brought up to date for this
        run's model and metrics in the same transaction, so no reader sees one without the other."""
        import pyarrow.parquet as pq

        from atlas import schema
        from atlas.records import RunRecord

        self._require_writer()
        shard = Path(shard_dir)
        manifest = json.loads((shard / "run.json").read_text())
        run, model = RunRecord.from_row(manifest["run"]), manifest["model"]
        tables = {name: pq.read_table(shard / f"{name}.parquet") for name in schema.SHARD_TABLES
                  if (shard / f"{name}.parquet").exists()}  # read before the transaction: short window
        rows = 0
        with self.transaction():
            touched = self._run_metrics(run.run_id)  # what the run held before: a re-ingest may drop a metric
            # a run never ingested has no rows to delete: skip the deletes, each a scan of a history table
            seen = bool(self.con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run.run_id]).fetchall()[0][0])
            self._replace_row(schema.models, model)
            self._ensure_model_id(run.model_key)
            self._replace_row(schema.runs, run.row())
            for name, table in tables.items():
                self.con.register("_shard", table)  # connection-local: other cursors never see it
                try:
                    if name == "concepts":
                        self.con.execute("INSERT OR REPLACE INTO concepts BY NAME SELECT * FROM _shard")
                    else:
                        if seen:
                            self.con.execute(f"DELETE FROM {name} WHERE run_id = ?", [run.run_id])
                        self.con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM _shard")
                        self._index_run(name, run.run_id, run.model_key, seen)
                finally:
                    self.con.unregister("_shard")
                rows += table.num_rows
            metrics = _metric_set(tables["head_metrics"]) if "head_metrics" in tables else self._run_metrics(run.run_id)
            if "head_metrics" in tables and not touched and self._is_newest(run, metrics):
                self._merge_latest(run.model_key, tables["head_metrics"], metrics)
                self._refresh_wide(run.model_key, metrics)
            else:
                self._refresh(run.model_key, touched | metrics)
            for table in LATEST_HEAD_ROWS:  # a re-ingest may have dropped the run's rows of a table
                if table in tables or seen:
                    self._refresh_head_rows(table, run.model_key)
        return rows

    def record_failure(self, run: RunRecord, model: dict[str, Any] | None) -> None:
        """Keep a failed unit visible (status + error) without touching its earlier results."""
        from atlas import schema

        self._require_writer()
        with self.transaction():
            if model is not None:
                self._replace_row(schema.models, model)
            self._ensure_model_id(run.model_key)
            self._replace_row(schema.runs, run.row())
            self._refresh(run.model_key, self._run_metrics(run.run_id))  # its rows may have been the latest
            for table in LATEST_HEAD_ROWS:
                self._refresh_head_rows(table, run.model_key)

    # -- derived tables (see atlas/schema.py): kept by the writer, inside the ingest's transaction ---------
    def _run_metrics(self, run_id: str) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT metric FROM metric_runs WHERE run_id = ?", [run_id]).fetchall()}

    def _index_run(self, table: str, run_id: str, model_key: str, seen: bool = True) -> None:
        """Note which metrics / concepts the shard `_shard` brought for this run, and how many rows."""
        index, column = {"head_metrics": ("metric_runs", "metric"),
                         "concept_scores": ("concept_runs", "concept")}.get(table, (None, None))
        if index is None:
            return
        if seen:
            self.con.execute(f"DELETE FROM {index} WHERE run_id = ?", [run_id])
        self.con.execute(f"INSERT INTO {index} SELECT ?, ?, {column}, count(*) FROM _shard "
                         f"GROUP BY {column} ORDER BY {column}", [run_id, model_key])

    def _ensure_model_id(self, model_key: str) -> None:
        """Give a model seen for the first time the next model_id (ids are never reused or changed)."""
        self.con.execute("INSERT INTO model_ids SELECT ?, (SELECT coalesce(max(model_id), 0) + 1 FROM model_ids) "
                         "WHERE NOT EXISTS (SELECT 1 FROM model_ids WHERE model_key = ?)", [model_key, model_key])

    def _model_id(self, model_key: str) -> int:
        return int(self.con.execute("SELECT model_id FROM model_ids WHERE model_key = ?", [model_key]).fetchall()[0][0])

    def _refresh_head_rows(self, table: str, model_key: str | None) -> None:
        """Recompute latest_head_tokens / latest_concept_scores for one model (None: every model) from the
        history: the newest complete run's rows per head and kind / concept."""
        from atlas import schema

        group = LATEST_HEAD_ROWS[table]
        target = f"latest_{table}"
        if model_key is None:
            self.con.execute(f"DELETE FROM {target}")
            where, params = "", []
        else:
            self.con.execute(f"DELETE FROM {target} WHERE model_id = ?", [self._model_id(model_key)])
            where, params = "AND t.model_key = ?", [model_key]
        self.con.execute(f"INSERT INTO {target} BY NAME {schema.latest_head_rows_select(table, group, where)} "
                         f"ORDER BY model_id, layer, head, {group}, rank", params)

    def _refresh(self, model_key: str, metrics: set[str]) -> None:
        """Recompute the latest values (with ranks) of one model's `metrics`, then its wide rows: the
        cost is that model's history of those metrics, whatever the rest of the atlas holds."""
        from atlas import schema

        if metrics:
            chosen = sorted(metrics)
            self.con.execute("DELETE FROM latest_head_metrics WHERE model_key = ? AND list_contains(?, metric)",
                             [model_key, chosen])
            self.con.execute(
                f"INSERT INTO latest_head_metrics BY NAME SELECT *, ? AS model_id FROM "
                f"({schema.latest_select('AND hm.model_key = ? AND list_contains(?, hm.metric)')}) "
                f"ORDER BY metric, layer, head", [self._model_id(model_key), model_key, chosen])
        self._refresh_wide(model_key)

    def _is_newest(self, run: RunRecord, metrics: set[str]) -> bool:
        """Whether this complete run supersedes every other complete run of its model that holds any of
        `metrics` (later finished_at; on a tie, the larger run_id), as the latest_select window orders."""
        if run.status != "complete" or run.finished_at is None or not metrics:
            return False
        finished = _to_sql_datetime(run.finished_at)
        newer = self.con.execute(
            "SELECT count(*) FROM metric_runs mr JOIN runs r USING (run_id) "
            "WHERE mr.model_key = ? AND list_contains(?, mr.metric) AND r.status = 'complete' AND r.run_id <> ? "
            "AND (r.finished_at > ? OR (r.finished_at = ? AND r.run_id > ?))",  # NULL sorts last: older
            [run.model_key, sorted(metrics), run.run_id, finished, finished, run.run_id]).fetchall()
        return newer[0][0] == 0

    def _merge_latest(self, model_key: str, shard: pa.Table, metrics: set[str]) -> None:
        """The common ingest, a new run newer than any other of its metrics: each head's latest row is
        the run's own, or stays what it was where the run has no row for the head. The history is not
        read; the ranks are recomputed over the model's latest rows of these metrics."""
        chosen = sorted(metrics)
        self.con.register("_shard", shard)
        try:
            self.con.execute("CREATE OR REPLACE TEMP TABLE _old_latest AS SELECT run_id, model_key, layer, head, "
                             "metric, value, n, stderr FROM latest_head_metrics "
                             "WHERE model_key = ? AND list_contains(?, metric)", [model_key, chosen])
            self.con.execute("DELETE FROM latest_head_metrics WHERE model_key = ? AND list_contains(?, metric)",
                             [model_key, chosen])
            self.con.execute("""
                INSERT INTO latest_head_metrics BY NAME
                SELECT *, rank() OVER (PARTITION BY metric ORDER BY value DESC) AS rank,
                       count(*) OVER (PARTITION BY metric) AS "of", ? AS model_id
                FROM (SELECT run_id, model_key, layer, head, metric, value, n, stderr FROM _shard
                      UNION ALL
                      SELECT * FROM _old_latest o WHERE NOT EXISTS (
                          SELECT 1 FROM _shard s WHERE s.metric = o.metric AND s.layer = o.layer AND s.head = o.head))
                ORDER BY metric, layer, head""", [self._model_id(model_key)])
        finally:
            self.con.unregister("_shard")

    def _refresh_wide(self, model_key: str | None, changed: set[str] | None = None) -> None:
        """Rewrite the wide rows of one model (None: every model), adding a column for a new metric.
        With `changed`, and the model's rows already there with its current shape and alias, only those
        metric columns are recomputed."""
        from atlas import schema

        if model_key is not None and changed and self._wide_is_current(model_key):
            self._update_wide(model_key, schema.wide_columns(sorted(changed)))
            return

        have = {r[0] for r in self.con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = 'head_roles_wide' "
            "AND schema_name = 'main' AND database_name = current_database()").fetchall()}
        metrics = schema.wide_columns([r[0] for r in self.metric_ids()])
        added = [m for m in metrics if m not in have]
        for metric in added:
            self.con.execute(f'ALTER TABLE head_roles_wide ADD COLUMN "{metric}" DOUBLE')
        if added or model_key is None:
            self.con.execute(schema.head_roles_view(metrics))
        if model_key is None:
            self.con.execute("DELETE FROM head_roles_wide")
            models_from, latest_where = "models", ""
        else:
            self.con.execute("DELETE FROM head_roles_wide WHERE model_key = ?", [model_key])
            key = schema.sql_text(model_key)
            models_from = f"(SELECT * FROM models WHERE model_key = {key})"
            latest_where = f"WHERE model_key = {key}"
        heads = schema.heads_select(models_from)
        if not metrics:
            self.con.execute(f"INSERT INTO head_roles_wide BY NAME {heads} ORDER BY m.model_key, l.layer, h.head")
            return
        listed = ", ".join(schema.sql_text(m) for m in metrics)
        pivot = (f"(PIVOT (SELECT model_key, layer, head, metric, value FROM latest_head_metrics {latest_where}) "
                 f"ON metric IN ({listed}) USING first(value) GROUP BY model_key, layer, head)")
        self.con.execute(f"INSERT INTO head_roles_wide BY NAME SELECT h.*, p.* EXCLUDE (model_key, layer, head) "
                         f"FROM ({heads}) h LEFT JOIN {pivot} p USING (model_key, layer, head) "
                         f"ORDER BY h.model_key, h.layer, h.head")


    def _wide_is_current(self, model_key: str) -> bool:
        """The model's wide rows exist, every metric has its column (metric ids with a quote have none,
        see schema.wide_columns), and the heads columns match its models row. One statement."""
        found = self.con.execute(
            "SELECT count(*), count(*) FILTER (WHERE w.alias IS NOT DISTINCT FROM m.alias "
            "AND w.n_layers = m.n_layers AND w.n_heads = m.n_heads AND w.n_kv_heads = m.n_kv_heads), "
            "any_value(m.n_layers * m.n_heads), "
            "(SELECT count(*) FROM (SELECT DISTINCT metric FROM metric_runs) mr "
            " WHERE NOT contains(mr.metric, chr(39)) AND NOT contains(mr.metric, chr(34)) "
            " AND mr.metric NOT IN (SELECT column_name FROM duckdb_columns() WHERE table_name = 'head_roles_wide' "
            "   AND schema_name = 'main' AND database_name = current_database())) "
            "FROM head_roles_wide w JOIN models m USING (model_key) WHERE model_key = ?", [model_key]).fetchall()[0]
        return found[3] == 0 and found[0] > 0 and found[0] == found[1] == found[2]

    def _update_wide(self, model_key: str, metrics: list[str]) -> None:
        """Set some metric columns of one model's wide rows from its latest rows, in place. Only after a
        merge (_merge_latest): there a head's latest value is replaced or kept, never removed, so the
        heads the pivot leaves out keep the value they have."""
        from atlas import schema

        if not metrics:
            return
        key = schema.sql_text(model_key)
        listed = ", ".join(schema.sql_text(m) for m in metrics)
        assigned = ", ".join(f'"{m}" = p."{m}"' for m in metrics)
        pivot = (f"(PIVOT (SELECT model_key, layer, head, metric, value FROM latest_head_metrics "
                 f"WHERE model_key = {key} AND metric IN ({listed})) "
                 f"ON metric IN ({listed}) USING first(value) GROUP BY model_key, layer, head)")
        self.con.execute(f"UPDATE head_roles_wide w SET {assigned} FROM {pivot} p WHERE w.model_key = {key} "
                         f"AND p.model_key = w.model_key AND p.layer = w.layer AND p.head = w.head")


# history tables with a per-head latest copy (atlas/schema.py), and what "latest" is taken per
LATEST_HEAD_ROWS = {"head_tokens": "kind", "concept_scores": "concept"}


def _metric_set(table: pa.Table) -> set[str]:
    """The metric ids of a head_metrics shard table (what _index_run just recorded for the run)."""
    import pyarrow.compute as pc

    return set(pc.unique(table.column("metric")).to_pylist())


def _to_sql_datetime(value: Any) -> Any:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _to_sql(column: sa.Column, value: Any) -> Any:
    """Shard manifests are JSON: turn their strings back into the column's type."""
    import sqlalchemy as sa

    if value is None:
        return None
    if isinstance(column.type, sa.JSON) and not isinstance(value, str):
        return json.dumps(value, sort_keys=True)
    if isinstance(column.type, sa.DateTime) and isinstance(value, str):
        return datetime.fromisoformat(value)
    return value


def open(path: str | Path, *, wait_s: float = 10.0) -> Atlas:
    """Notebook entry point: `atlas.open("atlas.duckdb").query("SELECT ...").to_pandas()`."""
    return Atlas(path, read_only=True, wait_s=wait_s)


# Instance-wide and irreversible (lock_configuration last): after this, SQL on any cursor of the
# instance reaches no file but the database's own, installs or loads no extension, reads no secret,
# and changes no setting. Ingest still works: it hands DuckDB Arrow tables read in Python.
SANDBOX_SETTINGS: tuple[tuple[str, object], ...] = (
    ("python_enable_replacements", False),  # no scans of Python variables named in the SQL
    ("autoinstall_known_extensions", False),
    ("autoload_known_extensions", False),
    ("allow_community_extensions", False),
    ("allow_extension_repositories", "forbidden"),
    ("allow_persistent_secrets", False),
    ("enable_external_access", False),  # no read_csv/'file'/glob/COPY/ATTACH of files/INSTALL/LOAD/http
)


def sandbox(con: duckdb.DuckDBPyConnection, *, memory_limit: str | None = None,
            temp_limit: str | None = None) -> None:
    """Lock this connection's DuckDB instance for serving untrusted SQL (see SANDBOX_SETTINGS).

    `memory_limit` bounds what DuckDB's buffer manager holds (sorts, joins, aggregates spill to the
    database's own temp directory, bounded by `temp_limit`)."""
    import duckdb

    settings = list(SANDBOX_SETTINGS)
    if memory_limit:
        settings.insert(0, ("memory_limit", memory_limit))
    if temp_limit:
        settings.insert(0, ("max_temp_directory_size", temp_limit))
    for name, value in settings:
        try:
            con.execute(f"SET {name} = ?", [value])
        except duckdb.Error as exc:
            raise BadInput(f"cannot set {name} = {value!r} on the atlas: {exc}",
                           "check --memory-limit (e.g. 2GB)") from exc
    con.execute("SET lock_configuration = true")
