"""`atlas edit` and `atlas concepts`: scale a concept's heads and watch the generation change."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.app import DEFAULT_DB, DbOption, FormatOption, JsonFlag, app, output_format, reports_errors
from cli.output import Format, emit, emit_json

if TYPE_CHECKING:
    import pyarrow as pa


def concept_table(db: Path, concept: str, model: str | None, top: int, all_models: bool) -> pa.Table:
    """For `atlas heads --concept`: heads per model, or one row per model with --all-models."""
    from atlas.concepts import concept_across_models, concept_heads
    from atlas.store import Atlas

    with Atlas(db) as atlas:
        return concept_across_models(atlas, concept, top) if all_models else concept_heads(atlas, concept, model, top)


@app.command()
@reports_errors
def edit(
    prompt: Annotated[str, typer.Argument(help="The prompt to continue.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Alias, repo id, directory or .gguf.")] = "llama",
    concept: Annotated[str, typer.Option(help="The concept whose top heads are scaled.")] = "colors",
    k: Annotated[int, typer.Option("--k", help="How many top heads (from the atlas).")] = 3,
    alpha: Annotated[float, typer.Option(help="Scale: -1 suppresses, 0 ablates, 5 enhances.")] = -1.0,
    heads: Annotated[str | None, typer.Option(help="Explicit heads instead of the atlas's: 3.2,5.0 "
                                                     "(or L3.H2,L5.H0).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Greedy tokens to generate.")] = 24,
    db: DbOption = Path(DEFAULT_DB),
    as_json: JsonFlag = False,
) -> None:
    """Generate before and after scaling a concept's top-k heads (read from the atlas).

    Example: atlas edit --model llama --concept colors --k 3 --alpha -1 "The sky on a clear day is"
    """
    from atlas.heads import parse_heads
    from cli.output import stderr
    from workers.families.pursuit.editing import edit_from_atlas

    result = edit_from_atlas(str(db), model, concept, k, alpha, prompt,
                             parse_heads(heads) if heads else None, max_new_tokens)
    if as_json:
        emit_json(result)
        return
    names = ", ".join(f"L{lay}.H{h}" for lay, h in result["heads"])
    stderr.print(f"heads {names} scaled by {alpha:g}")
    typer.echo(f"before: {prompt}{result['before']}")
    typer.echo(f"after:  {prompt}{result['after']}")
    if "mass_before" in result:
        typer.echo(f"{result['concept']} mass of the next token: {result['mass_before']:.4f} -> "
                   f"{result['mass_after']:.4f}; concept words: {result['words_before']} -> {result['words_after']}")


@app.command()
@reports_errors
def concepts(
    verify: Annotated[bool, typer.Option("--verify", help="Show the editing check stored in the atlas.")] = False,
    concept: Annotated[str | None, typer.Option(help="Only this concept (with --verify).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Only this model (with --verify).")] = None,
    metric: Annotated[str | None, typer.Option(help="concept_mass, concept_words or corpus_loss.")] = None,
    db: DbOption = Path(DEFAULT_DB),
    fmt: FormatOption = Format.table,
    as_json: JsonFlag = False,
) -> None:
    """List the built-in concepts, or (--verify) what editing each concept's heads did.

    Example: atlas concepts --verify --concept colors --model llama --metric concept_mass
    """
    if verify:
        from atlas.concepts import verification
        from atlas.store import Atlas

        with Atlas(db) as atlas:
            emit(verification(atlas, concept, model, metric), output_format(fmt, as_json), title="editing check")
        return
    from workers.concepts import builtin_concepts

    rows = [{"concept": c.name, "words": len(c.words), "prompts": len(c.prompts), "heldout": len(c.heldout),
             "examples": ", ".join(c.words[:6])} for c in builtin_concepts().values()]
    import pyarrow as pa

    emit(pa.Table.from_pylist(rows), output_format(fmt, as_json), title="built-in concepts")
