"""Per-head capture and intervention on the attention output projection's input (z).

Hooks act on z split per head, so they are safe under GQA: query head h's slice is its own even
when it shares K/V with other heads. Context managers remove every hook on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from workers.adapters import BoundAdapter

ZEdit = Callable[[int, torch.Tensor], torch.Tensor | None]  # (layer, z (b,p,h,d)) -> new z or None


@contextmanager
def edit_z(adapter: BoundAdapter, edit: ZEdit, layers: Iterable[int] | None = None) -> Iterator[None]:
    """Run `edit` on every chosen layer's z before W_O; returning a tensor replaces z."""
    handles = []
    for layer in range(adapter.n_layers) if layers is None else layers:
        def pre_hook(module, args, _layer=layer):
            z = args[0]
            new = edit(_layer, adapter.split_heads(z))
            if new is None:
                return None
            return (new.reshape(z.shape).to(z.dtype), *args[1:])
        handles.append(adapter.out_proj(layer).register_forward_pre_hook(pre_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_z(adapter: BoundAdapter, layers: Iterable[int] | None = None,
              detach: bool = True) -> Iterator[dict[int, torch.Tensor]]:
    """Collect z per layer as (batch, pos, n_heads, d_head)."""
    store: dict[int, torch.Tensor] = {}

    def keep(layer: int, z: torch.Tensor) -> None:
        store[layer] = z.detach() if detach else z

    with edit_z(adapter, keep, layers):
        yield store


def scale_heads(heads: Iterable[tuple[int, int]], alpha: float) -> ZEdit:
    """Multiply the chosen heads' z by alpha (0 = zero ablation, -1 = invert, 5 = enhance)."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def edit(layer: int, z: torch.Tensor) -> torch.Tensor | None:
        chosen = by_layer.get(layer)
        if not chosen:
            return None
        z = z.clone()
        z[:, :, chosen] = z[:, :, chosen] * alpha
        return z

    return edit


def replace_heads(values: dict[tuple[int, int], torch.Tensor]) -> ZEdit:
    """Replace heads' z with given tensors (mean or resample ablation), broadcast to (b, p, d)."""

    def edit(layer: int, z: torch.Tensor) -> torch.Tensor | None:
        mine = {h: v for (lay, h), v in values.items() if lay == layer}
        if not mine:
            return None
        z = z.clone()
        for head, value in mine.items():
            z[:, :, head] = value.to(z.dtype).expand_as(z[:, :, head])
        return z

    return edit


@contextmanager
def scaled(adapter: BoundAdapter, heads: Iterable[tuple[int, int]], alpha: float) -> Iterator[None]:
    heads = list(heads)
    with edit_z(adapter, scale_heads(heads, alpha), sorted({layer for layer, _ in heads})):
        yield
