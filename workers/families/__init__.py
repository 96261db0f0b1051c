"""The family registry: every metric family, built-in or not, is found here by name."""

from __future__ import annotations

from workers.families.base import Family, FamilyResult
from workers.families.lens import LensFamily
from workers.families.patterns import PatternsFamily
from workers.families.pursuit import PursuitFamily
from workers.families.retrieval import RetrievalFamily

FAMILIES: dict[str, Family] = {family.name: family for family in (
    PatternsFamily(), LensFamily(), PursuitFamily(), RetrievalFamily())}


def get_family(name: str) -> Family:
    from atlas.errors import BadInput

    if name not in FAMILIES:
        raise BadInput(f"unknown family '{name}'", f"known families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "Family", "FamilyResult", "get_family"]
