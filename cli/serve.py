"""`atlas serve`: run the atlas as a service. Wires workers.build into atlas.server's build slot."""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.app import DEFAULT_DB, DbOption, app, reports_errors
from cli.output import stderr

if TYPE_CHECKING:  # pydantic loads when a build request is checked, not with every command
    from atlas.records import BuildRequest


class WorkerBuilder:
    """The server's `Builder`: checks a request on the request thread, runs it on the build thread.

    Both run `only_under(data_dirs)`: a corpus, concept file or model directory named in a request
    resolves only under the directories the operator allowed (none by default), read bounded."""

    def __init__(self, db: Path, executor: str, address: str | None, device: str,
                 data_dirs: Sequence[Path] = ()) -> None:
        self.db, self.executor, self.address, self.device = db, executor, address, device
        self.data_dirs = [Path(d) for d in data_dirs]

    def _corpus(self, spec: str | None) -> str | None:
        """The corpus as the workers will name it: the file's real path, or `hf:` + a dataset id."""
        from atlas.errors import BadInput
        from workers.corpora import EMBEDDED, HF_PREFIX
        from workers.models import REPO_ID
        from workers.user_files import confine

        if spec in (None, "", EMBEDDED) or spec.startswith(HF_PREFIX):
            return spec
        try:
            return str(confine(spec, self.data_dirs))
        except BadInput:
            if REPO_ID.match(spec) and ".." not in spec:
                return HF_PREFIX + spec
            raise

    def _concept(self, spec: str) -> str:
        """A concept spec with its file (if any) named by real path, so workers anywhere find it."""
        from workers.concepts import _concept_path, builtin_concepts

        spec = spec.strip()
        if spec in builtin_concepts():
            return spec
        name, _, value = spec.partition("=") if "=" in spec else ("", "", spec)
        path = _concept_path(value)
        return spec if path is None else (f"{name}={path}" if name else str(path))

    def validate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Resolve models, families and files, and plan the build: every option goes through the one
        validator (workers.plan.plan -> workers.options.validate), as on the CLI and in sweep files.
        Bad input raises here, before the build is queued and before anything is written."""
        from workers.build import plan_build
        from workers.models import resolve
        from workers.plan import family_names
        from workers.user_files import only_under

        asked = _request(request)
        families = family_names(asked.families)
        with only_under(self.data_dirs):
            # Files are named by real path, found under the data dirs only, whether the request names
            # them as fields or in `options`: they move to their fields.
            merged = asked.family_options()  # one option given twice, differently, is refused here
            corpus, concepts = merged.get("corpus"), merged.get("concepts")
            if isinstance(corpus, list):
                corpus = [self._corpus(c) if isinstance(c, str) else c for c in corpus]
            elif isinstance(corpus, str):
                corpus = self._corpus(corpus)
            if isinstance(concepts, str):
                concepts = [c for c in concepts.split(",") if c.strip()]
            if isinstance(concepts, list):
                concepts = [self._concept(c) if isinstance(c, str) else c for c in concepts]
            options = {k: v for k, v in asked.options.items() if k not in ("corpus", "concepts")}
            checked = asked.model_copy(update={"families": families, "corpus": corpus, "concepts": concepts,
                                               "options": options})
            sources = [resolve(spec) for spec in checked.models]
            units = plan_build(checked.models, families, checked.family_options(), "cpu", None, sources)
        return {**checked.model_dump(exclude_none=True), "units": len(units)}

    def run(self, request: dict[str, Any], open_writer: Any, progress: Any) -> dict[str, Any]:
        from workers.build import build
        from workers.user_files import only_under

        checked = _request(request)
        with only_under(self.data_dirs):
            report = build(checked.models, checked.families, self.db, device=self.device,
                           address=self.address, executor=self.executor, options=checked.family_options(),
                           progress=progress, open_writer=open_writer, take_lock=False)
        return {"planned": report.planned, "skipped": report.skipped, "completed": len(report.completed),
                "failed": report.failed, "rows": report.rows, "tokens": report.tokens,
                "seconds": round(report.seconds, 2)}


def _request(request: dict[str, Any]) -> BuildRequest:
    """The request as the server took it (a checked request also carries its unit count)."""
    from pydantic import ValidationError

    from atlas.errors import BadInput
    from atlas.records import BuildRequest

    try:
        return BuildRequest.model_validate({k: v for k, v in request.items() if k in BuildRequest.model_fields})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BadInput(f"not a build request: {problems}", "see POST /api/builds in /openapi.json") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
@reports_errors
def serve(
    db: DbOption = Path(DEFAULT_DB),
    host: Annotated[str, typer.Option(help="Interface to bind. Anything but loopback needs --token "
                                           "(or --insecure).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    address: Annotated[str | None, typer.Option(help="Ray cluster address for builds; omit for a local one.")] = None,
    executor: Annotated[str, typer.Option(help="ray, or local (builds run in the server process).")] = "ray",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda for builds.")] = "auto",
    data_dir: Annotated[list[Path] | None, typer.Option(
        "--data-dir", help="A directory whose files (corpora, concept lists, models) builds may read; "
                           "repeatable. Without it, submitted builds read no files.")] = None,
    token: Annotated[str | None, typer.Option(envvar="ATLAS_TOKEN", help="Bearer token every request must "
                                              "carry (Authorization: Bearer ...).")] = None,
    build_token: Annotated[str | None, typer.Option(envvar="ATLAS_BUILD_TOKEN", help="A separate token for "
                                                    "POST /api/builds (default: --token).")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow a non-loopback --host without --token.")] = False,
    sql_timeout: Annotated[float, typer.Option(help="Seconds a SQL query may run before it is stopped.")] = 5.0,
    max_rows: Annotated[int, typer.Option(help="Most rows a SQL query may return.")] = 10_000,
    max_result_mb: Annotated[float, typer.Option(help="Most MiB (Arrow) a SQL result may hold.")] = 16.0,
    memory_limit: Annotated[str, typer.Option(help="DuckDB's memory limit for the server (e.g. 4GB).")] = "2GB",
    temp_limit: Annotated[str, typer.Option(help="Most disk DuckDB may spill to (sorts, joins) while serving.")]
    = "4GB",
    max_file_mb: Annotated[float, typer.Option(help="Largest file (MiB) a submitted build may read.")] = 64.0,
) -> None:
    """Serve the atlas over HTTP: JSON API (/api, /openapi.json), HTML pages, and builds.

    The server is the atlas's single writer: it holds the file and the build lock while it runs,
    so `atlas build` on the same --db fails at once; submit builds to it instead. User SQL runs on
    a DuckDB instance with no file access, no extensions and locked settings.

    Example: atlas serve --db atlas.duckdb --data-dir ./corpora --token "$(openssl rand -hex 16)"
    """
    import uvicorn

    from atlas.errors import BadInput
    from atlas.server import AtlasService, create_app
    from workers.build import build_lock
    from workers.user_files import DATA_DIRS_ENV, MAX_FILE_MB_ENV

    if executor not in ("ray", "local"):
        raise BadInput(f"unknown executor '{executor}'", "use ray or local")
    if min(sql_timeout, max_rows, max_result_mb, max_file_mb) <= 0:
        raise BadInput("--sql-timeout, --max-rows, --max-result-mb and --max-file-mb must be positive")
    if not is_loopback(host) and not token:
        if not insecure:
            raise BadInput(f"refusing to serve on {host} without --token: anyone who can reach the port could "
                           "query the atlas and submit builds",
                           "pass --token (or set ATLAS_TOKEN), or --insecure if a proxy authenticates")
        stderr.print(f"[bold yellow]warning:[/] {host} with --insecure: every query, page and POST "
                     "/api/builds is open to anyone who can reach this port")
    dirs = [d.resolve() for d in data_dir or []]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise BadInput(f"--data-dir {missing[0]} is not a directory", "pass existing directories")
    # Workers this process starts (a local Ray, the local executor) inherit the same limits.
    os.environ[DATA_DIRS_ENV] = os.pathsep.join(str(d) for d in dirs)
    os.environ[MAX_FILE_MB_ENV] = str(max_file_mb)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with build_lock(db):
        service = AtlasService(db, WorkerBuilder(db, executor, address, device, dirs), sql_timeout_s=sql_timeout,
                               max_rows=max_rows, max_bytes=int(max_result_mb * 2**20), memory_limit=memory_limit,
                               temp_limit=temp_limit)
        try:
            stderr.print(f"serving {db} on http://{host}:{port} (API: /api, OpenAPI: /openapi.json; "
                         f"{'token required' if token or build_token else 'no token'}; "
                         f"builds read {len(dirs)} data dir(s))")
            uvicorn.run(create_app(service, token=token, build_token=build_token), host=host, port=port,
                        log_level="warning")
        finally:
            service.close()
