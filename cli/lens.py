"""`atlas show MODEL L.H` (a head's card) and `atlas lens train` (trained per-head lenses)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.app import DEFAULT_DB, DbOption, FormatOption, JsonFlag, app, output_format, reports_errors
from cli.output import Format, emit, emit_json, stderr

if TYPE_CHECKING:
    import pyarrow as pa

lens_app = typer.Typer(no_args_is_help=True, help="Trained per-head lenses (Attention Lens, in head space).")
app.add_typer(lens_app, name="lens")


@app.command()
@reports_errors
def show(
    model: Annotated[str, typer.Argument(help="Alias or model key.")],
    head: Annotated[str, typer.Argument(help="LAYER.HEAD, e.g. 18.6.")],
    top: Annotated[int, typer.Option(help="Tokens and concepts to show per kind.")] = 10,
    db: DbOption = Path(DEFAULT_DB),
    fmt: FormatOption = Format.table,
    as_json: JsonFlag = False,
) -> None:
    """Print one head's card: every metric with its rank among the model's heads, its token readouts
    (promote, suppress, lens, ...) and concept scores.

    Example: atlas show llama 18.6
    """
    from atlas.cards import card_json, head_card
    from atlas.examples import head_examples
    from atlas.store import Atlas

    with Atlas(db) as atlas:
        card = head_card(atlas, model, head, top)
        examples = head_examples(atlas, card["model_key"], card["layer"], card["head"])
    fmt = output_format(fmt, as_json)
    if fmt is Format.json:
        emit_json({**card_json(card), "examples": examples})
        return
    name = f"{card['model']} {card['layer']}.{card['head']}"
    stderr.print(f"[bold]{name}[/]  kv_head {card['kv_head']}  depth {card['depth']}  ({card['model_key']})")
    if card["metrics"].num_rows:
        _section(card["metrics"], fmt, f"{name}: metrics (rank 1 = highest of the model's heads)")
    for kind, table in card["tokens"].items():
        _section(table, fmt, f"{name}: {kind} tokens")
    if card["concepts"].num_rows:
        _section(card["concepts"], fmt, f"{name}: concepts")
    if examples:
        _section(_example_table(examples), fmt, f"{name}: example contexts ({{query}}, <most-attended key>)")
    if not (card["metrics"].num_rows or card["tokens"] or card["concepts"].num_rows or examples):
        stderr.print("nothing stored for this head yet; run `atlas build`")


def _example_table(examples: dict[str, list[dict[str, Any]]]) -> pa.Table:
    """One row per stored example: criterion, rank, score and the context as one line."""
    import pyarrow as pa

    from atlas.examples import context_text

    rows = [{"criterion": criterion, "rank": e["rank"], "score": e["score"], "context": context_text(e)}
            for criterion, kept in examples.items() for e in kept]
    return pa.Table.from_pylist(rows)


def _section(table: pa.Table, fmt: Format, title: str) -> None:
    """A table with its title (on stderr when stdout is piped, so the data stays parseable)."""
    if not sys.stdout.isatty():
        stderr.print(f"# {title}", highlight=False)
    emit(table, fmt, title=title)


@lens_app.command("train")
@reports_errors
def train(
    model: Annotated[str, typer.Option("--model", "-m", help="Alias, repo id, directory or .gguf.")],
    layers: Annotated[str | None, typer.Option(help="Comma-separated layers (negative counts from the end); "
                                                    "default: three spread over the second half.")] = None,
    steps: Annotated[int, typer.Option(help="Adam steps per layer (resumes from saved weights).")] = 100,
    corpus: Annotated[str | None, typer.Option(help="Corpus: .txt, .jsonl, .parquet or HF dataset.")] = None,
    text_field: Annotated[str, typer.Option(help="JSONL field / Parquet column with the text.")] = "text",
    lr: Annotated[float, typer.Option(help="Adam learning rate of the maps.")] = 1e-3,
    bias_lr: Annotated[float, typer.Option(help="Adam learning rate of the biases.")] = 0.1,
    positions: Annotated[int, typer.Option(help="Token positions per step.")] = 64,
    docs: Annotated[int, typer.Option(help="Documents to read (every 5th held out).")] = 40,
    window: Annotated[int, typer.Option(help="Tokens per document, at most.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the position sampler.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    db: DbOption = Path(DEFAULT_DB),
    as_json: JsonFlag = False,
) -> None:
    """Train one vocab x d_head lens per head of some layers, starting from the head's logit lens.

    Weights go to <db stem>_lenses/ as safetensors; KL before/after and the lens readouts
    (head_tokens kind 'lens') go into the atlas as a `lens_trained` run.

    Example: atlas lens train --model llama --layers 20,25,29 --steps 200
    """
    from workers.families.lens.training import train_lenses

    report = train_lenses(model, db, layers=layers, steps=steps, corpus=corpus, text_field=text_field, lr=lr,
                          bias_lr=bias_lr, positions=positions, docs=docs, window=window, seed=seed, device=device,
                          progress=lambda message: stderr.print(message, highlight=False))
    if as_json:
        emit_json(report)
        return
    stderr.print(f"weights in {report['weights']}; run {report['run_id']} in {report['db']}")
    rows: list[dict[str, Any]] = [{**r, "kl_mean_output_baseline": report["kl_mean_output_baseline"]}
                                  for r in report["layers"]]
    import pyarrow as pa

    emit(pa.Table.from_pylist(rows), Format.table, title="held-out KL to the model's output (nats)")
