"""The one small interface every metric family implements, and what a run of one returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from workers.models import LoadedModel
from workers.options import Option


@dataclass
class FamilyResult:
    """Rows per atlas table (see atlas.schema.SHARD_TABLES), plus tokens processed."""

    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    tokens: int = 0
    extra_config: dict[str, Any] = field(default_factory=dict)  # facts learned while running


class Family(Protocol):
    """Read-only members, so plain class attributes satisfy them: `stores = ("head_metrics",)` (a
    tuple[str]), a ClassVar dict for `definitions`, or instance attributes in a plugin."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def stores(self) -> tuple[str, ...]:
        """The atlas tables it writes."""
        ...

    @property
    def options(self) -> tuple[Option, ...]:
        """What a user may set (workers/options.py); checked before planning."""
        ...

    @property
    def definitions(self) -> dict[str, str]:
        """Prose: how the metrics are defined; stored with each run, never hashed."""
        ...

    def config(self, options: dict[str, Any]) -> dict[str, Any]:
        """The full, explicit config from user options: defaults filled in, hashed into the run id.
        Values only: prose belongs in `definitions`, so rewording it does not force a rebuild."""
        ...

    def probe_set(self, config: dict[str, Any]) -> str:
        """A readable id for the probe set or corpus the run reads."""
        ...

    def run(self, lm: LoadedModel, config: dict[str, Any]) -> FamilyResult:
        """Forward passes with hooks, reduced to per-head rows (never raw activations)."""
        ...


def scaled_batch(config: dict[str, Any], size: int) -> int:
    """The batch size to use now: halved on each retry of a unit that failed (e.g. out of memory)."""
    return max(1, size // int(config.get("_batch_divisor", 1)))


def head_metric_rows(metric: str, values: Any, stderrs: Any | None, n: int) -> list[dict[str, Any]]:
    """Rows for head_metrics from (n_layers, n_heads) arrays; run_id/model_key are added later."""
    rows = []
    for layer, row in enumerate(values.tolist()):
        for head, value in enumerate(row):
            rows.append({"layer": layer, "head": head, "metric": metric, "value": float(value), "n": n,
                         "stderr": None if stderrs is None else float(stderrs[layer][head])})
    return rows
