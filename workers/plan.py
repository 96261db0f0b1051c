"""Cut a build into units with deterministic keys, so a re-run can skip what is done."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from workers.families import get_family
from workers.models import ModelSource


def stable_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Unit:
    """One (model, family, probe set) piece of work; its run_id is its key in the atlas."""

    run_id: str
    source: ModelSource
    family: str
    family_version: int
    probe_set: str
    config: dict[str, Any]
    config_hash: str


def family_names(asked: list[str] | str) -> list[str]:
    """Family names as a build takes them: 'all' (alone) is every registered family, a string is
    comma-separated; an unknown name raises BadInput."""
    from workers.families import FAMILIES

    names = [n.strip() for n in asked.split(",")] if isinstance(asked, str) else [n.strip() for n in asked]
    names = [n for n in names if n]
    if not names:
        from atlas.errors import BadInput

        raise BadInput("no families given", f"name some ({', '.join(FAMILIES)}) or 'all'")
    if names == ["all"]:
        return list(FAMILIES)
    for name in names:
        get_family(name)
    return names


def plan(sources: list[ModelSource], families: list[str], options: dict[str, Any],
         dtype: str) -> list[Unit]:
    """Every unit of a build. The family options are checked first, by the one validator
    (workers.options.validate), whichever door they came through: `atlas build` flags and -o,
    a sweep-file entry, or POST /api/builds; bad input raises BadInput before anything is written."""
    from workers.options import validate

    options = validate([get_family(name) for name in families], options)
    units = []
    for source in sources:
        for name in families:
            family = get_family(name)
            config = {**family.config(options), "dtype": dtype}
            config_hash = stable_hash(config)
            probe_set = family.probe_set(config)
            run_id = f"{name}-" + stable_hash([source.key, name, family.version, probe_set, config_hash])
            units.append(Unit(run_id, source, name, family.version, probe_set, config, config_hash))
    return units
