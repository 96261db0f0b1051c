"""A client of `atlas serve` with the read methods of the local queries, returning the same tables.

`atlas query|heads|models --server URL` use it; in a notebook:
    Client("http://127.0.0.1:8765").rank_heads("induction", top=5).to_pandas()
Errors come back as the same AtlasError classes (and so the same CLI exit codes) as local reads.
"""

from __future__ import annotations

import os
import time
from typing import Any

import httpx
import pyarrow as pa

from atlas.errors import AtlasError, BadInput, Busy, NotFound, SchemaMismatch

ERRORS: dict[str, type[AtlasError]] = {"BadInput": BadInput, "TooLarge": BadInput, "TimedOut": BadInput,
                                       "BadRequest": BadInput, "NotFound": NotFound, "Busy": Busy,
                                       "TooMany": Busy, "SchemaMismatch": SchemaMismatch}
TOKEN_ENV = "ATLAS_TOKEN"


def _table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> pa.Table:
    if not rows and columns:
        return pa.table({c: pa.array([], pa.null()) for c in columns})
    return pa.Table.from_pylist(rows)


class Client:
    """HTTP reads (and build submissions) against one server.

    `token` (default: the ATLAS_TOKEN environment variable) is sent as `Authorization: Bearer`;
    the CLI's --server mode gets it the same way."""

    def __init__(self, url: str, timeout_s: float = 60.0, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=self.auth_headers())

    def auth_headers(self) -> dict[str, str]:
        token = self.token if self.token is not None else os.environ.get(TOKEN_ENV) or None
        return {"Authorization": f"Bearer {token}"} if token else {}

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise Busy(f"cannot reach the atlas server at {self.url}: {exc}",
                       "start it with `atlas serve`, or check --server") from exc
        if response.status_code < 400:
            return response.json()
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text[:300]}
        if not isinstance(body, dict):
            body = {"message": str(body)[:300]}
        if response.status_code == 422 and "detail" in body:  # request validation (an older server)
            problems = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in body["detail"])
            raise BadInput(f"the server rejected the request: {problems}")
        if response.status_code in (401, 403):
            raise BadInput(body.get("message") or "the server needs a token",
                           body.get("hint") or f"set {TOKEN_ENV} to the server's token")
        cls = ERRORS.get(body.get("error", ""), AtlasError)
        raise cls(body.get("message") or f"HTTP {response.status_code}", body.get("hint"))

    # -- the reads the CLI has locally ----------------------------------------------------
    def query(self, sql: str, max_rows: int | None = None, timeout_s: float | None = None) -> pa.Table:
        body: dict[str, Any] = {"sql": sql}
        if max_rows:
            body["max_rows"] = max_rows
        if timeout_s:
            body["timeout_s"] = timeout_s
        result = self._call("POST", "/api/sql", json=body)
        return _table(result["rows"], result["columns"])

    def rank_heads(self, metric: str, model: str | None = None, top: int = 10,
                   ascending: bool = False) -> pa.Table:
        params = {"metric": metric, "top": top, "ascending": ascending, **({"model": model} if model else {})}
        return _table(self._call("GET", "/api/heads", params=params))

    def concept_heads(self, concept: str, model: str | None = None, top: int = 10) -> pa.Table:
        params = {"concept": concept, "top": top, **({"model": model} if model else {})}
        return _table(self._call("GET", "/api/heads", params=params))

    def list_models(self) -> pa.Table:
        return _table(self._call("GET", "/api/models"))

    def metric_ids(self) -> list[str]:
        return self._call("GET", "/api/metrics")

    def head_card(self, model: str, layer: int, head: int) -> dict[str, Any]:
        return self._call("GET", f"/api/heads/{model}/{layer}/{head}")

    # -- builds ---------------------------------------------------------------------------
    def submit_build(self, models: list[str], families: list[str] | None = None, **options: Any) -> dict[str, Any]:
        """POST /api/builds; `options` are BuildRequest's other fields (atlas/records.py): seed, corpus,
        criterion, verify, ..., and `options={"n_random": 3}` for any other family option."""
        return self._call("POST", "/api/builds", json={"models": models, "families": families or ["all"],
                                                       **options})

    def build(self, build_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/builds/{build_id}")

    def wait_build(self, build_id: str, timeout_s: float = 600.0, poll_s: float = 0.5) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.build(build_id)
            if state["status"] in ("complete", "failed") or time.monotonic() > deadline:
                return state
            time.sleep(poll_s)
