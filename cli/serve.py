"""`atlas serve`: run the atlas as a service. Wires workers.build into atlas.server's build slot."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.main import DEFAULT_DB, DbOption, app, reports_errors
from cli.output import stderr


class WorkerBuilder:
    """The server's `Builder`: checks a request on the request thread, runs it on the build thread."""

    def __init__(self, db: Path, executor: str, address: str | None, device: str) -> None:
        self.db, self.executor, self.address, self.device = db, executor, address, device

    @staticmethod
    def options(request: dict[str, Any]) -> dict[str, Any]:
        concepts = request.get("concepts")
        given = {"seed": request.get("seed", 0), "corpus": request.get("corpus"),
                 "text_field": request.get("text_field", "text"),
                 "concepts": ",".join(concepts) if concepts else None, "ablation": request.get("ablation"),
                 "method": request.get("method"), "max_context": request.get("max_context")}
        return {key: value for key, value in given.items() if value is not None}

    def validate(self, request: dict[str, Any]) -> dict[str, Any]:
        """Resolve models and families and run every family's config(): bad input raises here,
        before the build is queued and before anything is written."""
        from workers.families import FAMILIES, get_family
        from workers.models import resolve
        from workers.plan import plan

        families = list(FAMILIES) if request["families"] == ["all"] else request["families"]
        for name in families:
            get_family(name)
        sources = [resolve(spec) for spec in request["models"]]
        units = plan(sources, families, self.options(request), "float32")
        return {**request, "families": families, "units": len(units)}

    def run(self, request: dict[str, Any], open_writer: Any, progress: Any) -> dict[str, Any]:
        from workers.build import build

        report = build(request["models"], request["families"], self.db, device=self.device,
                       address=self.address, executor=self.executor, options=self.options(request),
                       progress=progress, open_writer=open_writer, take_lock=False)
        return {"planned": report.planned, "skipped": report.skipped, "completed": len(report.completed),
                "failed": report.failed, "rows": report.rows, "tokens": report.tokens,
                "seconds": round(report.seconds, 2)}


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
    host: Annotated[str, typer.Option(help="Interface to bind. Anything but loopback exposes the atlas "
                                           "and its build endpoint, with no authentication.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    address: Annotated[str | None, typer.Option(help="Ray cluster address for builds; omit for a local one.")] = None,
    executor: Annotated[str, typer.Option(help="ray, or local (builds run in the server process).")] = "ray",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda for builds.")] = "auto",
    sql_timeout: Annotated[float, typer.Option(help="Seconds a SQL query may run before it is stopped.")] = 5.0,
    max_rows: Annotated[int, typer.Option(help="Most rows a SQL query may return.")] = 10_000,
) -> None:
    """Serve the atlas over HTTP: JSON API (/api, /openapi.json), HTML pages, and builds.

    The server is the atlas's single writer: it holds the file and the build lock while it runs,
    so `atlas build` on the same --db fails at once; submit builds to it instead.

    Example: atlas serve --db atlas.duckdb --port 8765
    """
    import uvicorn

    from atlas.errors import BadInput
    from atlas.server import AtlasService, create_app
    from workers.build import build_lock

    if executor not in ("ray", "local"):
        raise BadInput(f"unknown executor '{executor}'", "use ray or local")
    if not is_loopback(host):
        stderr.print(f"[bold yellow]warning:[/] binding {host} exposes every query, page and POST /api/builds "
                     "to anyone who can reach this port; there is no authentication")
    with build_lock(db):
        service = AtlasService(db, WorkerBuilder(db, executor, address, device),
                               sql_timeout_s=sql_timeout, max_rows=max_rows)
        try:
            stderr.print(f"serving {db} on http://{host}:{port} (API: /api, OpenAPI: /openapi.json)")
            uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
        finally:
            service.close()
