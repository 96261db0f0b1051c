"""The model aliases (workers/aliases.toml), read as data: `atlas models` lists them without importing
the model loaders (workers.models, which pulls in torch and transformers)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

ALIASES_FILE = Path(__file__).resolve().parent.parent / "workers" / "aliases.toml"


def aliases() -> dict[str, dict[str, Any]]:
    """{alias: its entry}: name, kind, package, install, origin and where the weights are."""
    return tomllib.loads(ALIASES_FILE.read_text())
