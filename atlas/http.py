"""The server's HTTP edge: bearer tokens, and one error shape for everything that goes wrong.

Every error a client sees is JSON `{"error", "message", "hint"}` with paths redacted: the
server's own errors, FastAPI's request validation (400 for a bad query or path parameter, 422
for a bad body), unknown routes, and anything unexpected (500, traceback to the server log only,
never to the client, and the connection stays usable).
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from atlas.errors import AtlasError, BadInput, Busy, NotFound, SchemaMismatch, TimedOut, TooMany, Unauthorized
from atlas.sql_guard import TooLarge

log = logging.getLogger("atlas.server")

STATUS = {TooLarge: 413, TimedOut: 408, BadInput: 400, NotFound: 404, TooMany: 429, Busy: 409,
          SchemaMismatch: 500}

# An absolute path with two or more parts (not an /api route): shown to clients by its last part.
_PATH = re.compile(r"(?<![\w.:/~])/(?!api/)(?:[^\s'\"()<>,;]+/)+([^\s'\"()<>,;]*)")


def redact(text: str | None) -> str | None:
    """Server paths out of a client-facing message: `/srv/data/x.txt` -> `.../x.txt`."""
    return None if text is None else _PATH.sub(lambda m: ".../" + m.group(1), text)


def status_of(exc: AtlasError) -> int:
    if isinstance(exc, Unauthorized):
        return exc.status
    return next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)


def error_body(exc: AtlasError) -> dict[str, Any]:
    return {"error": type(exc).__name__, "message": redact(exc.message), "hint": redact(exc.hint)}


def _json(status: int, error: str, message: str, hint: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, "hint": hint}, status_code=status, headers=headers)


def _problems(exc: RequestValidationError) -> tuple[bool, str]:
    """(any problem in the body?, one line naming each bad field)."""
    parts, in_body = [], False
    for error in exc.errors():
        loc = [str(x) for x in error.get("loc", ())]
        in_body |= bool(loc) and loc[0] == "body"
        parts.append(f"{'.'.join(loc[1:] or loc)}: {error.get('msg', 'invalid')}")
    return in_body, "; ".join(parts)[:1000]


def wants_html(request: Request) -> bool:
    """A page (not /api) asked for by a browser (Accept names text/html)."""
    return not request.url.path.startswith("/api") and "text/html" in request.headers.get("accept", "")


def _token_ok(given: str | None, *expected: str | None) -> bool:
    return given is not None and any(e is not None and hmac.compare_digest(given.encode(), e.encode())
                                     for e in expected)


def add_errors_and_auth(app: FastAPI, *, token: str | None, build_token: str | None,
                        error_page: Callable[[int, dict[str, Any]], Response] | None = None) -> None:
    """Register the error handlers and, when a token is set, the bearer check on every request;
    `error_page(status, body)` answers a browser asking for a page."""
    @app.exception_handler(AtlasError)
    async def _atlas_error(request: Request, exc: AtlasError) -> Response:
        body, status = error_body(exc), status_of(exc)
        if error_page is not None and wants_html(request):  # a browser on a page: the same message, as a page
            return error_page(status, body)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        in_body, problems = _problems(exc)
        if in_body:
            return _json(422, "BadRequest", f"the request body is not valid: {redact(problems)}",
                         "see /openapi.json for the fields and their types")
        return _json(400, "BadInput", f"bad parameter: {redact(problems)}", "see /openapi.json")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        name = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return _json(exc.status_code, name, str(exc.detail), "see /openapi.json for the routes",
                     headers=getattr(exc, "headers", None))

    @app.middleware("http")
    async def _guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Any:
        if token is not None or build_token is not None:
            refused = _refuse(request, token, build_token)
            if refused is not None:
                return refused
        too_big = _body_refused(request)
        if too_big is not None:
            return too_big
        try:
            return await call_next(request)
        except Exception:  # the one place an unexpected error becomes a response
            log.exception("internal error on %s %s", request.method, request.url.path)
            return _json(500, "InternalError", "the server failed on this request; the details are in "
                         "its log", "if it happens again, tell the server's operator")


MAX_BODY = 1 << 20  # a build request or a SQL statement is a few kB


def _body_refused(request: Request) -> JSONResponse | None:
    """Bodies are read whole before validation: refuse a large one by its declared length, and
    one with no length (chunked), instead of reading it."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return None
    length = request.headers.get("content-length")
    if length is None:
        if request.headers.get("transfer-encoding"):
            return _json(411, "LengthRequired", "send the body with a Content-Length",
                         "any HTTP client does by default")
        return None
    if not length.isdigit() or int(length) > MAX_BODY:
        return _json(413, "TooLarge", f"the request body is over {MAX_BODY} bytes", "send a smaller request")
    return None


def _refuse(request: Request, token: str | None, build_token: str | None) -> JSONResponse | None:
    """401 without a valid token; 403 for a read token on the build endpoint when builds have their own."""
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else None
    is_build = request.method == "POST" and request.url.path.rstrip("/") == "/api/builds"
    challenge = {"WWW-Authenticate": "Bearer"}
    if is_build:
        needed = build_token or token
        if _token_ok(given, needed):
            return None
        if build_token is not None and _token_ok(given, token):
            return _json(403, "Forbidden", "this token may read but not submit builds",
                         "use the build token (ATLAS_BUILD_TOKEN)")
        return _json(401, "Unauthorized", "submitting a build needs a bearer token",
                     "send Authorization: Bearer <token> (the client reads ATLAS_TOKEN)", challenge)
    if token is None or _token_ok(given, token, build_token):
        return None
    return _json(401, "Unauthorized", "this server needs a bearer token",
                 "send Authorization: Bearer <token> (the client and CLI read ATLAS_TOKEN)", challenge)
