"""The family registry: every metric family, built-in or not, is found here by name."""

from __future__ import annotations

from workers.families.ablation import AblationFamily
from workers.families.base import Family, FamilyResult
from workers.families.circuits import CircuitsFamily
from workers.families.examples import ExamplesFamily
from workers.families.lens import LensFamily
from workers.families.patterns import PatternsFamily
from workers.families.pursuit import PursuitFamily
from workers.families.retrieval import RetrievalFamily

FAMILIES: dict[str, Family] = {family.name: family for family in (
    PatternsFamily(), LensFamily(), AblationFamily(), PursuitFamily(), RetrievalFamily(), CircuitsFamily(),
    ExamplesFamily())}


def _load_plugins() -> None:
    """Third-party families come through one door: the `head_atlas.families` entry-point group,
    or modules named in HEAD_ATLAS_FAMILIES (comma-separated), each exposing `FAMILIES` (a list)."""
    import importlib
    import os
    from importlib.metadata import entry_points

    objects = [ep.load() for ep in entry_points(group="head_atlas.families")]
    for module in filter(None, (m.strip() for m in os.environ.get("HEAD_ATLAS_FAMILIES", "").split(","))):
        objects += list(importlib.import_module(module).FAMILIES)
    for family in objects:
        FAMILIES.setdefault(family.name, family)


_load_plugins()


def get_family(name: str) -> Family:
    from atlas.errors import BadInput

    if name not in FAMILIES:
        raise BadInput(f"unknown family '{name}'", f"known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "Family", "FamilyResult", "get_family"]
