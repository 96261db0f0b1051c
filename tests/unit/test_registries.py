"""Everything registered is documented: every command in the README's CLI table, every family in
docs/families.md and docs/options.md, every alias and adapter family in docs/models.md."""

from __future__ import annotations

from pathlib import Path

import typer.main

from cli.main import app
from workers.adapters import ADAPTERS
from workers.families import FAMILIES
from workers.models import aliases

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
FAMILIES_DOC = (ROOT / "docs" / "families.md").read_text()
OPTIONS_DOC = (ROOT / "docs" / "options.md").read_text()
MODELS_DOC = (ROOT / "docs" / "models.md").read_text()


def _commands(group: typer.Typer, prefix: str = "atlas") -> list[str]:
    click_group = typer.main.get_command(group)
    names = []
    for name, command in click_group.commands.items():
        names.append(f"{prefix} {name}")
        if hasattr(command, "commands"):
            names += [f"{prefix} {name} {sub}" for sub in command.commands]
    return names


def test_every_command_is_in_the_readme() -> None:
    missing = [c for c in _commands(app) if c not in README]
    assert not missing, f"document these commands in README.md: {missing}"


def test_every_command_has_help_with_an_example() -> None:
    click_group = typer.main.get_command(app)
    for name, command in click_group.commands.items():
        if hasattr(command, "commands"):
            continue
        assert command.help and "Example" in command.help, f"atlas {name} needs help with an example"


def test_every_family_and_alias_is_documented() -> None:
    for name in FAMILIES:
        assert f"`{name}`" in FAMILIES_DOC, f"describe family {name} in docs/families.md"
        assert f"## {name} " in OPTIONS_DOC or f"## {name}\n" in OPTIONS_DOC, f"regenerate docs/options.md ({name})"
    for alias in aliases():
        assert f"`{alias}`" in MODELS_DOC, f"list alias {alias} in docs/models.md"


def test_every_adapter_family_is_named_in_the_models_doc() -> None:
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma 2",
             "gemma3": "Gemma 3", "phi3": "Phi-3", "gpt2": "GPT-2", "gpt_neox": "GPT-NeoX"}
    for spec in ADAPTERS.values():
        assert names[spec.family] in MODELS_DOC, f"name {spec.family} in docs/models.md"
