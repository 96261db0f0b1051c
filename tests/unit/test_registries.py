"""Everything registered is documented: every command, family, alias and adapter appears in the README."""

from __future__ import annotations

from pathlib import Path

import typer.main

from cli.main import app
from workers.adapters import ADAPTERS
from workers.families import FAMILIES
from workers.models import aliases

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


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


def test_every_family_and_alias_is_in_the_readme() -> None:
    for name in FAMILIES:
        assert f"`{name}`" in README or f"--families {name}" in README, name
    for alias in aliases():
        assert f"`{alias}`" in README, alias


def test_every_adapter_family_is_named_in_the_readme() -> None:
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma 2",
             "gemma3": "Gemma 3", "phi3": "Phi-3", "gpt2": "GPT-2", "gpt_neox": "GPT-NeoX"}
    for spec in ADAPTERS.values():
        assert names[spec.family] in README, spec.family
