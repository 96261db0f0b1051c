"""The one spelling of a head id: `LAYER.HEAD`, read in every form a user writes it.

`18.6`, `L18.H6`, `L18H6`, `18:6`, `18/6`, `L18 H6` (any case, spaces around) -> (18, 6). The CLI
(`show`, `match`, `edit --heads`), the pages' search box and the notebook API all parse heads here.
"""

from __future__ import annotations

import re

from atlas.errors import BadInput

# layer, a separator (. : / , space) and/or an H, head; "186" (no separator) is not a head
HEAD = r"[Ll]?(?P<layer>\d+)(?:\s*[.:/]\s*[Hh]?|\s*[Hh]|\s+[Hh]?)(?P<head>\d+)"
_HEAD = re.compile(rf"\s*{HEAD}\s*")


def parse_head(spec: str) -> tuple[int, int]:
    """One head id -> (layer, head); BadInput with the accepted forms otherwise."""
    found = _HEAD.fullmatch(spec or "")
    if not found:
        raise BadInput(f"'{spec}' is not a head", "write LAYER.HEAD, e.g. 18.6 (L18.H6, L18H6 and 18:6 work too)")
    return int(found["layer"]), int(found["head"])


def parse_heads(spec: str) -> list[tuple[int, int]]:
    """Comma-separated head ids -> [(layer, head), ...] in the order given."""
    items = [item for item in (spec or "").split(",") if item.strip()]
    if not items:
        raise BadInput("no heads given", "write them as LAYER.HEAD,LAYER.HEAD, e.g. 3.2,5.0")
    return [parse_head(item) for item in items]
