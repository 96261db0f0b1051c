"""`atlas serve`: the atlas as a service. The server process is the atlas's single writer.

One read-write DuckDB connection lives for the server's lifetime. Every request reads through its
own cursor (`con.cursor()`, a connection to the same database) inside a READ ONLY transaction, so
reads see committed data only, never write, and never wait for a build: ingest runs in short
transactions on another cursor (MVCC). The DuckDB instance is sandboxed at start
(`atlas.store.sandbox`): no file but the atlas, no extensions, no setting changes, whatever SQL a
client sends. Builds are submitted through an injected `Builder` (cli/serve.py wires workers.build
in, and with it the directories builds may read), so this module imports neither torch nor workers.
HTTP concerns (tokens, error bodies) live in atlas/http.py.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import duckdb
import pyarrow as pa
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from atlas import queries
from atlas.errors import AtlasError, BadInput, NotFound, TimedOut, TooMany
from atlas.http import add_errors_and_auth, redact, status_of
from atlas.pages.data import (
    check_index,
    check_top,
    concept_heads,
    exact_model_key,
    head_card,
    json_safe,
    list_concepts,
    rows,
)
from atlas.pages.views import add_pages, render
from atlas.records import BuildRequest
from atlas.sql_guard import TooLarge, check_read_only, fetch_bounded, json_safe_relation

__all__ = ["AtlasService", "BuildRequest", "TimedOut", "TooLarge", "TooMany", "create_app", "status_of"]

DEFAULT_SQL_TIMEOUT_S = 5.0
DEFAULT_MAX_ROWS = 10_000
DEFAULT_MAX_BYTES = 16 * 2**20  # Arrow bytes of one SQL result; its JSON is a few times that
DEFAULT_MAX_SQL = 4  # user SQL queries running at once; head cards and pages are not counted

log = logging.getLogger("atlas.server")


class SqlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sql: str = Field(min_length=1, max_length=20_000)
    max_rows: int | None = Field(default=None, gt=0, le=2**31)
    timeout_s: float | None = Field(default=None, gt=0, le=3600)


class Builder(Protocol):
    """Injected by the CLI: checks a request (a BuildRequest's fields; raising AtlasError, writing
    nothing) and runs it."""

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


def _unit_error(error: str | None) -> str:
    """A failed unit's reason for clients: its last line that is not traceback, paths redacted."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(("Traceback", "File ", "^", "~"))]
    return redact((reasons[0] if reasons else "unit failed")[:500]) or ""


class AtlasService:
    """Holds the one read-write connection; cursors for reads, a serialized handle for ingest."""

    def __init__(self, db: str | Path, builder: Builder | None = None, *,
                 sql_timeout_s: float = DEFAULT_SQL_TIMEOUT_S, max_rows: int = DEFAULT_MAX_ROWS,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_sql: int = DEFAULT_MAX_SQL,
                 memory_limit: str | None = None, temp_limit: str | None = None) -> None:
        from atlas.store import Atlas, sandbox

        self.db = Path(db)
        with duckdb.connect() as scratch:  # bad limits are refused before the atlas is opened or created
            sandbox(scratch, memory_limit=memory_limit, temp_limit=temp_limit)
        self.atlas = Atlas.writer(self.db)  # creates a fresh atlas; checks the schema version
        try:
            sandbox(self.atlas.con, memory_limit=memory_limit, temp_limit=temp_limit)
        except Exception:
            self.atlas.close()
            raise
        self.builder = builder
        self.sql_timeout_s, self.max_rows, self.max_bytes = sql_timeout_s, max_rows, max_bytes
        self.builds: dict[str, BuildState] = {}
        self._write = threading.Lock()
        self._cursors = threading.Lock()
        self._sql_slots = threading.BoundedSemaphore(max_sql)  # slow SQL never takes every thread
        self._check_slots = threading.BoundedSemaphore(2)  # nor do build checks
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
        """A read-only view for one request: one snapshot, and the engine refuses any write."""
        cursor = self._cursor()
        try:
            cursor.execute("BEGIN TRANSACTION READ ONLY")
            yield _handle(cursor, Path(self.db.name), read_only=True)  # messages name the file, not its path
        finally:
            with suppress(duckdb.Error):
                cursor.execute("ROLLBACK")
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

    @contextmanager
    def _slot(self, slots: threading.BoundedSemaphore, what: str) -> Iterator[None]:
        if not slots.acquire(timeout=1.0):
            raise TooMany(f"the server is already running its limit of {what}", "retry in a moment")
        try:
            yield
        finally:
            slots.release()

    # -- reads ----------------------------------------------------------------------------
    def sql(self, sql: str, max_rows: int | None = None, timeout_s: float | None = None,
            max_bytes: int | None = None) -> dict[str, Any]:
        """Read-only SQL, interrupted past its time limit, refused past its row or byte limit."""
        max_rows = min(max_rows or self.max_rows, self.max_rows)
        max_bytes = min(max_bytes or self.max_bytes, self.max_bytes)
        timeout_s = min(timeout_s or self.sql_timeout_s, self.sql_timeout_s)
        with self._slot(self._sql_slots, "concurrent SQL queries"), self.reader() as atlas:
            check_read_only(atlas.con, sql)
            timer = threading.Timer(timeout_s, atlas.con.interrupt)
            timer.start()
            try:
                table = fetch_bounded(json_safe_relation(atlas.con.sql(sql)), max_rows, max_bytes)
            except (duckdb.Error, pa.ArrowException, OSError) as exc:  # mid-stream, DuckDB errors come as Arrow's
                if isinstance(exc, duckdb.InterruptException) or "interrupt" in str(exc).lower():
                    raise TimedOut(f"the query ran past the time limit of {timeout_s:g}s and was stopped",
                                   "narrow it (WHERE, LIMIT) or aggregate first") from None
                if isinstance(exc, duckdb.OutOfMemoryException) or "out of memory" in str(exc).lower():
                    raise TooLarge("the query needs more memory than the server allows",
                                   "aggregate first, or select fewer or narrower columns") from None
                message = str(exc).strip()[:1000]
                raise BadInput(f"the query failed: {message}", "GET /api/schema lists tables and columns") from None
            finally:
                timer.cancel()
        return {"columns": table.column_names, "rows": rows(table)}

    # -- builds ---------------------------------------------------------------------------
    def submit(self, request: BuildRequest) -> BuildState:
        if self.builder is None:
            raise BadInput("this server takes no builds", "start it with `atlas serve` (the CLI wires builds in)")
        with self._slot(self._check_slots, "build checks at once"):
            # only what the client set (unset fields are None): a family that reads no `ablation` must
            # not see one; the builder plans it (every option through the one validator) before queueing
            checked = self.builder.validate(request.model_dump(exclude_none=True))
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
                    state.failed_units[payload.run_id] = _unit_error(payload.error)

        assert self.builder is not None  # submit() queues nothing without one
        try:
            state.report = self.builder.run(state.request, lambda: self.writer(state), progress)
            state.status = "failed" if state.failed_units else "complete"
        except AtlasError as exc:
            state.status, state.error = "failed", redact(exc.message)
        except Exception:  # a build failing must not take the server down; details go to the log only
            log.exception("build %s failed", state.id)
            state.status, state.error = "failed", "the build failed with an internal error (see the server log)"
        finally:
            state.finished_at = time.time()

    def build(self, build_id: str) -> BuildState:
        if build_id not in self.builds:
            raise NotFound(f"no build '{build_id}' on this server", "GET /api/builds lists them")
        return self.builds[build_id]


def create_app(service: AtlasService, *, token: str | None = None, build_token: str | None = None) -> FastAPI:
    """The JSON API under /api (OpenAPI at /openapi.json) and the HTML pages under /.

    `token` guards every request (`Authorization: Bearer TOKEN`); `build_token`, when given,
    is the one `POST /api/builds` takes instead."""
    app = FastAPI(title="head-atlas", version="1", docs_url=None, redoc_url=None,  # docs UIs load a CDN
                  description="What every attention head does, across models. Read-only SQL, head "
                              "cards, rankings; builds run on the server's cluster.")
    app.state.service = service
    add_errors_and_auth(app, token=token, build_token=build_token, error_page=_error_page)

    @app.get("/api/health", tags=["meta"])
    async def health() -> dict[str, Any]:  # on the event loop: answers even when every thread is busy
        return {"ok": True, "builds": len(service.builds), "takes_builds": service.builder is not None,
                "auth": token is not None or build_token is not None}

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
        check_top(top, service.max_rows)
        with service.reader() as atlas:
            key = exact_model_key(atlas, model) if model else None
            if metric is not None:
                return rows(queries.rank_heads(atlas, metric, key, top, ascending))
            return rows(concept_heads(atlas, concept or "", key, top))

    @app.get("/api/concepts", tags=["read"], summary="Concepts with scores")
    def concepts() -> list[dict[str, Any]]:
        with service.reader() as atlas:
            return rows(list_concepts(atlas))

    @app.get("/api/heads/{model:path}/{layer:int}/{head:int}", tags=["read"], summary="Everything about one head")
    def card(model: str, layer: int, head: int) -> dict[str, Any]:
        check_index(layer, head)
        with service.reader() as atlas:
            return json_safe(head_card(atlas, model, layer, head))  # resolves the model exactly, once

    @app.get("/api/schema", tags=["read"], summary="Tables and views with their columns, for SQL")
    def schema() -> dict[str, list[str]]:
        with service.reader() as atlas:
            found = atlas.con.execute(
                "SELECT table_name, list(column_name ORDER BY column_index) FROM duckdb_columns() "
                "WHERE database_name = current_database() AND NOT internal GROUP BY 1 ORDER BY 1").fetchall()
        return dict(found)

    @app.post("/api/sql", tags=["read"], summary="One read-only SQL statement, time-, row- and byte-limited")
    def sql(body: SqlRequest) -> dict[str, Any]:
        return service.sql(body.sql, body.max_rows, body.timeout_s)

    @app.post("/api/builds", tags=["build"], status_code=202, summary="Submit a build (runs in the background)")
    def submit(body: BuildRequest) -> dict[str, Any]:
        return service.submit(body).to_dict()

    @app.get("/api/builds", tags=["build"])
    def builds() -> list[dict[str, Any]]:
        return [b.to_dict() for b in service.builds.values()]

    @app.get("/api/builds/{build_id}", tags=["build"], summary="A build's progress")
    def build(build_id: str) -> dict[str, Any]:
        return service.build(build_id).to_dict()

    add_pages(app, service)
    return app


def _error_page(status: int, body: dict[str, Any]) -> Any:
    return render("error.html", status, message=body["message"], hint=body["hint"],
                  title="not found" if status == 404 else "error")

