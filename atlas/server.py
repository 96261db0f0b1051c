"""`atlas serve`: the atlas as a service. The server process is the atlas's single writer.

One read-write DuckDB connection lives for the server's lifetime. Every request reads through its
own cursor (`con.cursor()`, a connection to the same database), so reads see committed data only
and never wait for a build: ingest runs in short transactions on another cursor (MVCC). Builds are
submitted through an injected `Builder` (cli/serve.py wires workers.build in), so this module
imports neither torch nor workers.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import duckdb
import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from atlas import queries
from atlas.errors import AtlasError, BadInput, Busy, NotFound, SchemaMismatch
from atlas.pages.data import concept_heads, head_card, list_concepts

DEFAULT_SQL_TIMEOUT_S = 5.0
DEFAULT_MAX_ROWS = 10_000


class TooLarge(BadInput):
    """A result over the server's row limit."""


class TimedOut(BadInput):
    """A query that ran past the server's time limit (it was interrupted)."""


STATUS = {TooLarge: 413, TimedOut: 408, BadInput: 400, NotFound: 404, Busy: 409, SchemaMismatch: 500}


# Table functions a read query may call; everything else (read_csv, read_parquet, glob, duckdb_*,
# ...) could read the server's files or settings, so user SQL sees only the atlas's own relations.
SAFE_TABLE_FUNCTIONS = {"range", "generate_series", "unnest"}
UNSAFE_FUNCTIONS = {"getenv", "current_setting", "read_text", "read_blob"}


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """One SELECT over the atlas's tables and views only: no writes, no files, no settings."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise BadInput(f"the SQL does not parse: {exc}", "check the statement") from exc
    if len(statements) != 1:
        raise BadInput(f"expected one SQL statement, got {len(statements)}", "send one SELECT at a time")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise BadInput(f"only read queries are allowed, not {statements[0].type.name}",
                       "the server is the atlas's only writer; submit builds with POST /api/builds")
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
    if tree.get("error"):
        raise BadInput(f"the SQL does not parse: {tree.get('error_message')}", "check the statement")
    known = {r[0].lower() for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
        "UNION SELECT view_name FROM duckdb_views() WHERE NOT internal AND database_name = current_database()"
    ).fetchall()}
    nodes = list(_walk(tree))
    ctes = {key.lower() for node in nodes for key in _cte_names(node)}
    for node in nodes:
        kind = node.get("type")
        if kind == "BASE_TABLE":
            name = node.get("table_name", "").lower()
            if node.get("catalog_name") or node.get("schema_name") not in ("", "main") or \
                    name not in known | ctes:
                raise BadInput(f"'{node.get('table_name')}' is not a table of this atlas",
                               f"tables and views: {', '.join(sorted(known))}")
        elif kind == "TABLE_FUNCTION":
            name = node["function"].get("function_name", "").lower()
            if name not in SAFE_TABLE_FUNCTIONS:
                raise BadInput(f"the table function {name}() is not allowed on the server",
                               f"allowed: {', '.join(sorted(SAFE_TABLE_FUNCTIONS))}")
        elif node.get("class") == "FUNCTION" and node.get("function_name", "").lower() in UNSAFE_FUNCTIONS:
            raise BadInput(f"the function {node['function_name']}() is not allowed on the server")


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _cte_names(node: dict[str, Any]) -> list[str]:
    cte_map = node.get("cte_map")
    return [entry.get("key", "") for entry in cte_map.get("map", [])] if isinstance(cte_map, dict) else []


def status_of(exc: AtlasError) -> int:
    return next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)


class BuildRequest(BaseModel):
    """What `POST /api/builds` takes: the options of `atlas build`, nothing the server decides."""

    model_config = ConfigDict(extra="forbid")
    models: list[str] = Field(min_length=1, max_length=16, description="Aliases, repo ids, directories or .gguf")
    families: list[str] = Field(default_factory=lambda: ["all"], min_length=1)
    seed: int = 0
    corpus: str | None = None
    text_field: str = "text"
    concepts: list[str] | None = None
    ablation: Literal["zero", "mean", "resample"] = "mean"
    method: Literal["exact", "atp", "both"] = "both"
    max_context: int | None = Field(default=None, gt=0)


class SqlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sql: str = Field(min_length=1, max_length=20_000)
    max_rows: int | None = Field(default=None, gt=0)
    timeout_s: float | None = Field(default=None, gt=0)


class Builder(Protocol):
    """Injected by the CLI: checks a request (raising AtlasError, writing nothing) and runs it."""

    def validate(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def run(self, request: dict[str, Any], open_writer: Any, progress: Any) -> dict[str, Any]: ...


@dataclass
class BuildState:
    id: str
    request: dict[str, Any]
    status: str = "queued"  # queued -> running -> complete | failed
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    planned: int | None = None
    todo: int | None = None
    done: int = 0
    failed_units: dict[str, str] = field(default_factory=dict)
    ingest_windows: list[tuple[float, float]] = field(default_factory=list)  # (start, end) epoch s
    report: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "ingest_windows"}
        out["ingest_windows"] = [list(w) for w in self.ingest_windows]
        return out


def _handle(con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> Any:
    """An Atlas over one cursor of the server's connection (no new open, no version check)."""
    from atlas.store import Atlas

    atlas = Atlas.__new__(Atlas)
    atlas.path, atlas.read_only, atlas.con = path, read_only, con
    return atlas


class AtlasService:
    """Holds the one read-write connection; cursors for reads, a serialized handle for ingest."""

    def __init__(self, db: str | Path, builder: Builder | None = None, *,
                 sql_timeout_s: float = DEFAULT_SQL_TIMEOUT_S, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        from atlas.store import Atlas

        self.db = Path(db)
        self.atlas = Atlas.writer(self.db)  # creates a fresh atlas; checks the schema version
        self.builder = builder
        self.sql_timeout_s = sql_timeout_s
        self.max_rows = max_rows
        self.builds: dict[str, BuildState] = {}
        self._write = threading.Lock()
        self._cursors = threading.Lock()
        # One daemon build thread, builds in submission order: stopping the server stops a build
        # mid-unit without committing it (ingest is transactional), and a re-submit resumes it.
        self._queue: queue.Queue[BuildState | None] = queue.Queue()
        threading.Thread(target=self._worker, name="atlas-build", daemon=True).start()

    def close(self) -> None:
        self._queue.put(None)  # the build thread ends after the build in hand, if any
        with self._write:  # never close under an ingest transaction
            self.atlas.close()

    def _worker(self) -> None:
        while (state := self._queue.get()) is not None:
            self._run(state)

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        with self._cursors:  # the parent connection object itself is not thread-safe
            return self.atlas.con.cursor()

    @contextmanager
    def reader(self) -> Iterator[Any]:
        cursor = self._cursor()
        try:
            yield _handle(cursor, self.db, read_only=True)
        finally:
            cursor.close()

    @contextmanager
    def writer(self, state: BuildState | None = None) -> Iterator[Any]:
        """The builder's open_writer: one ingest at a time, on its own cursor, timed."""
        with self._write:
            cursor = self._cursor()
            start = time.time()
            try:
                yield _handle(cursor, self.db, read_only=False)
            finally:
                cursor.close()
                if state is not None:
                    state.ingest_windows.append((start, time.time()))

    # -- reads ----------------------------------------------------------------------------
    def sql(self, sql: str, max_rows: int | None = None, timeout_s: float | None = None) -> dict[str, Any]:
        """Read-only SQL, interrupted past its time limit, refused past its row limit."""
        max_rows = min(max_rows or self.max_rows, self.max_rows)
        timeout_s = min(timeout_s or self.sql_timeout_s, self.sql_timeout_s)
        with self.reader() as atlas:
            check_read_only(atlas.con, sql)
            timer = threading.Timer(timeout_s, atlas.con.interrupt)
            timer.start()
            try:
                table = _fetch(atlas.con, sql, max_rows)
            except duckdb.InterruptException as exc:
                raise TimedOut(f"the query ran past the time limit of {timeout_s:g}s and was stopped",
                               "narrow it (WHERE, LIMIT) or aggregate first") from exc
            except duckdb.Error as exc:
                if "interrupt" in str(exc).lower():
                    raise TimedOut(f"the query ran past the time limit of {timeout_s:g}s and was stopped",
                                   "narrow it (WHERE, LIMIT) or aggregate first") from None
                raise BadInput(f"the query failed: {exc}", "GET /api/schema lists tables and columns") from None
            finally:
                timer.cancel()
        return {"columns": table.column_names, "rows": table.to_pylist()}

    # -- builds ---------------------------------------------------------------------------
    def submit(self, request: BuildRequest) -> BuildState:
        if self.builder is None:
            raise BadInput("this server takes no builds", "start it with `atlas serve` (the CLI wires builds in)")
        checked = self.builder.validate(request.model_dump())  # raises before anything is queued
        state = BuildState(id=uuid.uuid4().hex[:12], request=checked)
        self.builds[state.id] = state
        self._queue.put(state)
        return state

    def _run(self, state: BuildState) -> None:
        state.status, state.started_at = "running", time.time()

        def progress(event: str, payload: Any) -> None:
            if event == "plan":
                state.planned, state.todo = payload["planned"], payload["todo"]
            elif event == "unit":
                state.done += 1
                if not getattr(payload, "ok", True):
                    state.failed_units[payload.run_id] = (payload.error or "").splitlines()[0]

        try:
            state.report = self.builder.run(state.request, lambda: self.writer(state), progress)
            state.status = "failed" if state.failed_units else "complete"
        except Exception as exc:  # a build failing must not take the server down
            state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            state.finished_at = time.time()

    def build(self, build_id: str) -> BuildState:
        if build_id not in self.builds:
            raise NotFound(f"no build '{build_id}' on this server", "GET /api/builds lists them")
        return self.builds[build_id]


def _fetch(con: duckdb.DuckDBPyConnection, sql: str, max_rows: int) -> pa.Table:
    """Stream at most max_rows + 1 rows; the stream is always closed (an open one pins the database)."""
    reader = con.sql(sql).to_arrow_reader(batch_size=min(max_rows + 1, 100_000))
    try:
        batches, n = [], 0
        for batch in reader:
            batches.append(batch)
            n += batch.num_rows
            if n > max_rows:
                raise TooLarge(f"the result has more than {max_rows} rows (the server's limit)",
                               "add a LIMIT, aggregate, or page with LIMIT/OFFSET")
        return pa.Table.from_batches(batches, schema=reader.schema)
    finally:
        reader.close()


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: send null."""
    if isinstance(value, float):
        return None if value != value or value in (float("inf"), float("-inf")) else value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def rows(table: pa.Table) -> list[dict[str, Any]]:
    return _clean(table.to_pylist())


def create_app(service: AtlasService) -> FastAPI:
    """The JSON API under /api (OpenAPI at /openapi.json) and the HTML pages under /."""
    app = FastAPI(title="head-atlas", version="1", docs_url=None, redoc_url=None,  # docs UIs load a CDN
                  description="What every attention head does, across models. Read-only SQL, head "
                              "cards, rankings; builds run on the server's cluster.")
    app.state.service = service

    @app.exception_handler(AtlasError)
    def _atlas_error(request: Request, exc: AtlasError) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__, "message": exc.message, "hint": exc.hint},
                            status_code=status_of(exc))

    @app.get("/api/health", tags=["meta"])
    def health() -> dict[str, Any]:
        return {"ok": True, "db": str(service.db), "builds": len(service.builds),
                "takes_builds": service.builder is not None}

    @app.get("/api/models", tags=["read"], summary="Models in the atlas")
    def models() -> list[dict[str, Any]]:
        with service.reader() as atlas:
            return rows(queries.list_models(atlas))

    @app.get("/api/metrics", tags=["read"], summary="Metric ids present")
    def metrics() -> list[str]:
        with service.reader() as atlas:
            return [r[0] for r in atlas.metric_ids()]

    @app.get("/api/heads", tags=["read"], summary="Heads ranked by a metric or a concept")
    def heads(metric: str | None = None, concept: str | None = None, model: str | None = None,
              top: int = 10, ascending: bool = False) -> list[dict[str, Any]]:
        if (metric is None) == (concept is None):
            raise BadInput("give exactly one of metric= or concept=", "e.g. /api/heads?metric=induction")
        if not 0 < top <= service.max_rows:
            raise BadInput(f"top must be between 1 and {service.max_rows}")
        with service.reader() as atlas:
            if metric is not None:
                return rows(queries.rank_heads(atlas, metric, model, top, ascending))
            return rows(concept_heads(atlas, concept, model, top))

    @app.get("/api/concepts", tags=["read"], summary="Concepts with scores")
    def concepts() -> list[dict[str, Any]]:
        with service.reader() as atlas:
            return rows(list_concepts(atlas))

    @app.get("/api/heads/{model:path}/{layer:int}/{head:int}", tags=["read"], summary="Everything about one head")
    def card(model: str, layer: int, head: int) -> dict[str, Any]:
        with service.reader() as atlas:
            return _clean(head_card(atlas, model, layer, head))

    @app.get("/api/schema", tags=["read"], summary="Tables and views with their columns, for SQL")
    def schema() -> dict[str, list[str]]:
        with service.reader() as atlas:
            found = atlas.con.execute(
                "SELECT table_name, list(column_name ORDER BY column_index) FROM duckdb_columns() "
                "WHERE database_name = current_database() AND NOT internal GROUP BY 1 ORDER BY 1").fetchall()
        return dict(found)

    @app.post("/api/sql", tags=["read"], summary="One read-only SQL statement, time- and row-limited")
    def sql(body: SqlRequest) -> dict[str, Any]:
        return _clean(service.sql(body.sql, body.max_rows, body.timeout_s))

    @app.post("/api/builds", tags=["build"], status_code=202, summary="Submit a build (runs in the background)")
    def submit(body: BuildRequest) -> dict[str, Any]:
        return service.submit(body).to_dict()

    @app.get("/api/builds", tags=["build"])
    def builds() -> list[dict[str, Any]]:
        return [b.to_dict() for b in service.builds.values()]

    @app.get("/api/builds/{build_id}", tags=["build"], summary="A build's progress")
    def build(build_id: str) -> dict[str, Any]:
        return service.build(build_id).to_dict()

    from atlas.pages.views import add_pages

    add_pages(app, service)
    return app
