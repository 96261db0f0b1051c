"""`atlas`: build and query the head atlas. Each command opens the library, calls one thing, prints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from atlas.errors import BadInput
from cli.app import (
    DEFAULT_DB,
    DbOption,
    FormatOption,
    JsonFlag,
    ServerOption,
    app,
    key_values,
    output_format,
    reports_errors,
)
from cli.output import Format, emit, emit_json, stderr


@app.command()
@reports_errors
def build(
    model: Annotated[list[str], typer.Option("--model", "-m", help="Alias, repo id, directory or .gguf; repeatable.")],
    families: Annotated[str, typer.Option(help="Comma-separated families, or 'all'.")] = "all",
    db: DbOption = Path(DEFAULT_DB),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    address: Annotated[str | None, typer.Option(help="Ray cluster address; omit to start a local one.")] = None,
    executor: Annotated[str, typer.Option(help="ray, or local (in-process, no Ray).")] = "ray",
    seed: Annotated[int | None, typer.Option(help="Seed of the built-in probe sets (default 0).")] = None,
    corpus: Annotated[list[str] | None, typer.Option(help="Corpus file or HF dataset; repeatable.")] = None,
    text_field: Annotated[str | None, typer.Option(help="JSONL field / Parquet column with the text.")] = None,
    concepts: Annotated[str | None, typer.Option(help="Comma-separated concepts, or a concept file (pursuit).")] = None,
    criterion: Annotated[str | None, typer.Option(help="SOMP criterion: l1 (per-sample) or l2 (streamed "
                                                       "covariance) (pursuit).")] = None,
    verify: Annotated[str | None, typer.Option(help="Editing check grid: small (default), standard, full "
                                                    "or off (pursuit).")] = None,
    ablation: Annotated[str | None, typer.Option(help="zero, mean (default), global_mean or resample "
                                                      "(ablation).")] = None,
    method: Annotated[str | None, typer.Option(help="exact, atp or both (default) (ablation).")] = None,
    max_context: Annotated[int | None, typer.Option(help="Longest haystack in tokens (retrieval).")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow a repo's own modeling code.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickle checkpoints (.bin).")] = False,
    replicas: Annotated[int, typer.Option(help="Ray actors (model copies) per model.")] = 1,
    gpus_per_actor: Annotated[float | None, typer.Option(help="GPUs per actor: 0.5 packs, 2 spreads.")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Any family option as KEY=VALUE "
                                                     "(n_random=10, readout_atoms=20); repeatable.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Compute every head's metrics for models and store them in the atlas (resumable).

    Example: atlas build --model llama --model gemma --families patterns,lens --corpus a.txt --corpus b.jsonl
    """
    from cli.sweep import build_request, run_and_report

    request = build_request({"models": model, "families": families, "seed": seed, "corpus": corpus or None,
                             "text_field": text_field, "concepts": concepts, "criterion": criterion,
                             "verify": verify, "ablation": ablation, "method": method, "max_context": max_context,
                             "options": key_values(option or [])}, "atlas build")
    run_and_report([request], db, as_json, device=device, address=address, executor=executor,
                   load_options={"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle},
                   replicas=replicas, gpus_per_actor=gpus_per_actor)


_key_values = key_values  # its old name here (cli/plan.py imports it; from cli.app avoids a cycle)


@app.command()
@reports_errors
def query(
    sql: Annotated[str, typer.Argument(help="One read-only SQL statement.")],
    db: DbOption = Path(DEFAULT_DB),
    server: ServerOption = None,
    fmt: FormatOption = Format.table,
    as_json: JsonFlag = False,
) -> None:
    """Run read-only SQL over the atlas (tables: models, runs, head_metrics; views: heads, head_roles).

    Example: atlas query "SELECT * FROM head_roles ORDER BY \\"patterns.induction\\" DESC LIMIT 5"
    """
    from atlas.store import Atlas

    if server:
        from atlas.client import Client

        with Client(server) as client:
            emit(client.query(sql), output_format(fmt, as_json))
        return
    with Atlas(db) as atlas:
        emit(atlas.query(sql), output_format(fmt, as_json))


@app.command()
@reports_errors
def heads(
    metric: Annotated[str | None, typer.Option(help="Metric id (patterns.induction) or its short name.")] = None,
    promotes: Annotated[str | None, typer.Option(help="A token (' Paris'): heads whose readout pushes it.")] = None,
    concept: Annotated[str | None, typer.Option(help="A concept (colors): heads ranked by Head Pursuit EVR.")] = None,
    all_models: Annotated[bool, typer.Option("--all-models", help="With --concept: one row per model.")] = False,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Alias or model key (default: all).")] = None,
    top: Annotated[int, typer.Option(help="How many heads per model.")] = 10,
    ascending: Annotated[bool, typer.Option(help="Rank lowest first.")] = False,
    db: DbOption = Path(DEFAULT_DB),
    server: ServerOption = None,
    fmt: FormatOption = Format.table,
    as_json: JsonFlag = False,
) -> None:
    """Rank heads by a metric, or by how much they push a token (--promotes).

    Example: atlas heads --metric induction --top 10 --model llama
    Example: atlas heads --promotes " Paris" --model llama
    Example: atlas heads --concept colors --top 10 --model llama   (or --all-models)
    """
    from atlas.queries import rank_heads
    from atlas.store import Atlas

    if sum(x is not None for x in (metric, promotes, concept)) != 1:
        raise BadInput("give exactly one of --metric / --promotes / --concept", "e.g. atlas heads --metric induction")
    if concept is not None:
        from cli.pursuit import concept_table

        if server:
            raise BadInput("--concept reads the atlas file directly", "drop --server and pass --db")
        emit(concept_table(db, concept, model, top, all_models), output_format(fmt, as_json),
             title=f"concept {concept}")
        return
    if promotes is not None:
        from atlas.lens_queries import rank_promoters

        if server:
            raise BadInput("--promotes reads the atlas file directly", "drop --server and pass --db")
        with Atlas(db) as atlas:
            emit(rank_promoters(atlas, promotes, model, top), output_format(fmt, as_json),
                 title=f"promotes {promotes!r}")
        return
    assert metric is not None  # exactly one of the three was given
    if server:
        from atlas.client import Client

        with Client(server) as client:
            emit(client.rank_heads(metric, model, top, ascending), output_format(fmt, as_json), title=metric)
        return
    with Atlas(db) as atlas:
        emit(rank_heads(atlas, metric, model, top, ascending), output_format(fmt, as_json), title=metric)


@app.command()
@reports_errors
def roles(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Alias or model key (default: all).")] = None,
    top: Annotated[int, typer.Option(help="Top heads shown per role.")] = 5,
    db: DbOption = Path(DEFAULT_DB),
    fmt: FormatOption = Format.table,
    as_json: JsonFlag = False,
) -> None:
    """Top heads for each role, and how many heads pass its stored threshold.

    Example: atlas roles --model llama
    """
    from atlas.queries import role_summary
    from atlas.store import Atlas

    with Atlas(db) as atlas:
        emit(role_summary(atlas, model, top), output_format(fmt, as_json), title="roles")


@app.command()
@reports_errors
def models(
    db: DbOption = Path(DEFAULT_DB),
    server: ServerOption = None,
    fmt: FormatOption = Format.table,
    as_json: JsonFlag = False,
) -> None:
    """List the models in the atlas and the aliases available.

    Example: atlas models --json
    """
    from atlas.aliases import aliases
    from atlas.queries import list_models
    from atlas.store import Atlas

    fmt = output_format(fmt, as_json)
    in_atlas: Any = None  # an Arrow table; none without a file (pa.table({}) would import pandas)
    if server:
        from atlas.client import Client

        with Client(server) as client:
            in_atlas = client.list_models()
    elif db.exists():
        with Atlas(db) as atlas:
            in_atlas = list_models(atlas)
    known = [{"alias": name, "name": entry["name"], "package": entry["package"], "install": entry["install"],
              "origin": entry["origin"]} for name, entry in aliases().items()]
    if fmt is Format.json:
        emit_json({"models": in_atlas.to_pylist() if in_atlas is not None else [], "aliases": known})
        return
    if in_atlas is not None and in_atlas.num_rows:
        emit(in_atlas, fmt, title=f"models in {db}")
    else:
        stderr.print(f"no models in {db} yet")
    emit(known, fmt, title="aliases")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not stderr.is_terminal:  # a log or a pipe: no carriage-return progress bars from tqdm (weights, shards)
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app()


from cli import compare as _compare  # noqa: E402,F401
from cli import lens as _lens  # noqa: E402,F401
from cli import pursuit as _pursuit  # noqa: E402,F401
from cli import serve as _serve  # noqa: E402,F401


# `atlas sweep` and `atlas status` are registered here, after the command modules (the order --help
# lists them in), so that cli/sweep.py (pydantic, YAML, the driver) loads only when they run.
@app.command()
@reports_errors
def sweep(
    file: Annotated[Path, typer.Argument(help="A sweep YAML file: models, families, corpora, options, ray; or a "
                                              "list of builds.")],
    db: Annotated[Path | None, typer.Option("--db", envvar="ATLAS_DB", help="Overrides the file's db.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Run a sweep of many models x families x corpora from a YAML file (resumable).

    Every entry is checked (models, families, option names and values) before any of them runs.

    Example: atlas sweep docker/sweep.yaml
    """
    from cli.sweep import load_sweep, run_and_report

    spec = load_sweep(file)
    run_and_report(spec.builds, Path(db or spec.db or DEFAULT_DB), as_json, labels=spec.labels,
                   device=spec.device, address=spec.ray.address, executor=spec.executor,
                   replicas=spec.ray.replicas, gpus_per_actor=spec.ray.gpus_per_actor)


@app.command()
@reports_errors
def status(
    db: DbOption = Path(DEFAULT_DB),
    all_units: Annotated[bool, typer.Option("--all", help="List complete units too.")] = False,
    fmt: FormatOption = Format.table,
    as_json: JsonFlag = False,
) -> None:
    """Show the latest build on this atlas: units done, running, failed (with the error), left.

    Example: atlas status --db atlas.duckdb
    """
    import pyarrow as pa

    from atlas.errors import NotFound
    from atlas.status import read_status

    state = read_status(db)
    if state is None:
        raise NotFound(f"no build has run on {db}", "run `atlas build` first")
    units = state["units"]
    counts = {s: sum(u["state"] == s for u in units) for s in ("complete", "running", "pending", "failed",
                                                                 "interrupted")}
    fmt = output_format(fmt, as_json)
    if fmt is Format.json:
        emit_json({"live": state["live"], "pid": state["pid"], "started_at": state["started_at"],
                   "counts": counts, "units": units})
        return
    stderr.print(f"build pid {state['pid']} started {state['started_at']}: "
                 f"{'running' if state['live'] else 'not running'}; "
                 + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    shown = [dict(u, error=(u["error"] or "").splitlines()[0] if u["error"] else "")
             for u in units if all_units or u["state"] != "complete"]
    emit(pa.Table.from_pylist(shown) if shown else pa.table({"state": pa.array([], pa.string())}), fmt,
         title="units")
from cli import plan as _plan  # noqa: E402,F401
