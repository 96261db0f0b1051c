"""`atlas compare`, `atlas match`, `atlas export`: cross-model reports, head matching, exports."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.app import DEFAULT_DB, DbOption, FormatOption, JsonFlag, app, output_format, reports_errors
from cli.output import Format, emit, emit_json, stderr


def _split(values: list[str] | None) -> list[str] | None:
    """Repeatable options that also take comma-separated lists."""
    out = [v.strip() for value in values or [] for v in value.split(",") if v.strip()]
    return out or None


@app.command()
@reports_errors
def compare(
    models: Annotated[list[str] | None, typer.Argument(help="Aliases or model keys (default: every model).")] = None,
    metric: Annotated[list[str] | None, typer.Option("--metric", help="Metric ids or short names; repeatable "
                                                     "or comma-separated (default: all).")] = None,
    concept: Annotated[list[str] | None, typer.Option("--concept", help="Concepts to tabulate (default: all "
                                                      "with scores).")] = None,
    threshold: Annotated[list[str] | None, typer.Option("--threshold", help="Role threshold METRIC=VALUE, "
                                                        "overriding role_thresholds; repeatable.")] = None,
    top: Annotated[int, typer.Option(help="Top heads per model in each table.")] = 5,
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML report to write.")] = Path("report.html"),
    db: DbOption = Path(DEFAULT_DB),
    as_json: JsonFlag = False,
) -> None:
    """Compare models: a self-contained HTML report (works offline) and a summary on stdout.

    Example: atlas compare llama gemma --metric induction,prev_token --out report.html
    """
    from atlas.notebook import Notebook
    from atlas.report import parse_thresholds, summary, summary_text

    with Notebook(db) as atlas:
        data = atlas.compare(*(models or []), metrics=_split(metric), concepts=_split(concept),
                             thresholds=parse_thresholds(_split(threshold)), top=top, out=out)
    if as_json:
        emit_json({**summary(data), "report": str(out)})
    else:
        typer.echo(summary_text(data, out))


class By(enum.StrEnum):
    both = "both"
    profile = "profile"
    tokens = "tokens"


@app.command()
@reports_errors
def match(
    model: Annotated[str, typer.Argument(help="Model A: alias or model key.")],
    in_: Annotated[str, typer.Option("--in", help="Model B, searched for similar heads.")],  # required
    head: Annotated[str | None, typer.Argument(help="A head of model A as LAYER.HEAD (e.g. 18.6); omit for "
                                               "every head of A.")] = None,
    top: Annotated[int, typer.Option(help="Matches per head (default 10 for one head, 1 for all).")] = 0,
    by: Annotated[By, typer.Option(help="profile (rank-normalized metric scores), tokens (lens readout "
                                   "overlap) or both.")] = By.both,
    db: DbOption = Path(DEFAULT_DB),
    fmt: FormatOption = Format.table,
    as_json: JsonFlag = False,
) -> None:
    """Find the heads of another model most similar to a head (by scores and lens readouts).

    Example: atlas match llama 18.6 --in gemma
    """
    from atlas.match import match_all, match_head
    from atlas.store import Atlas

    with Atlas(db) as atlas:
        if head is None:
            table = match_all(atlas, model, in_, top or 1, by.value)
            title = f"best {in_} matches for every head of {model}"
        else:
            table = match_head(atlas, model, head, in_, top or 10, by.value)
            title = f"{in_} heads most like {model} {head}"
    emit(table, output_format(fmt, as_json), title=title)


class ExportFormat(enum.StrEnum):
    parquet = "parquet"
    headvis = "headvis"
    duoattention = "duoattention"


@app.command()
@reports_errors
def export(
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write.")],
    format: Annotated[ExportFormat, typer.Option("--format", help="parquet (partitioned by model_key), "
                                                 "headvis (Neuronpedia layout) or duoattention (per-KV-head "
                                                 "full/streaming labels, docs/kv-cache.md).")] = ExportFormat.parquet,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only these models; repeatable.")] = None,
    dataset: Annotated[str, typer.Option(help="HeadVis dataset folder name.")] = "head-atlas",
    budget: Annotated[float, typer.Option(help="duoattention: share of KV heads (all layers) that keep the full "
                                          "cache.")] = 0.25,
    sink: Annotated[int, typer.Option(help="duoattention: sink tokens a streaming head keeps.")] = 64,
    recent: Annotated[int, typer.Option(help="duoattention: recent tokens a streaming head keeps.")] = 256,
    by: Annotated[str, typer.Option("--by", help="duoattention: the metric that ranks heads.")] = "retrieval.score",
    aggregate: Annotated[str, typer.Option(help="duoattention: how a KV head's query heads combine: max or "
                                           "mean.")] = "max",
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier export in --out.")] = False,
    db: DbOption = Path(DEFAULT_DB),
    as_json: JsonFlag = False,
) -> None:
    """Export the atlas: a Parquet tree any engine reads, or HeadVis / Neuronpedia JSON.

    Example: atlas export --format parquet --out atlas_parquet

    Example: atlas export --format duoattention --model llama --budget 0.25 --out kv
    """
    from atlas.export import export_duoattention, export_headvis, export_parquet
    from atlas.store import Atlas

    result: dict[str, Any]
    with Atlas(db) as atlas:
        if format is ExportFormat.headvis:
            result = {"format": "headvis", "trees": export_headvis(atlas, out, _split(model), dataset, overwrite)}
        elif format is ExportFormat.duoattention:
            result = {"format": "duoattention", "trees": export_duoattention(
                atlas, out, _split(model), budget, sink, recent, by, aggregate, overwrite)}
        else:
            result = export_parquet(atlas, out, _split(model), overwrite)
    if as_json:
        emit_json(result)
    elif format is not ExportFormat.parquet:
        for key, tree in result["trees"].items():
            stderr.print(f"{key} -> {tree}")
    else:
        for name, info in result["tables"].items():
            stderr.print(f"{name}: {info['rows']} rows")
        stderr.print(f"-> {out} (read with: {result['read_with']['duckdb']})")
