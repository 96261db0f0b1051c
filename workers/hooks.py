"""Per-head capture and intervention on the attention output projection's input (z), and forwards
that resume at a layer from cached block inputs.

Hooks act on z split per head, so they are safe under GQA: query head h's slice is its own even
when it shares K/V with other heads. Context managers remove every hook on exit.

Resuming: an edit at layer l changes nothing below l, so exact ablation and the editing check run
the clean input once, keep every block's input (`block_inputs`), and start each edited forward at
its lowest edited layer (`resumed_at`). It works for any Hugging Face decoder whose model loop calls
its blocks in order: the blocks below l are swapped, for that forward only, for stand-ins that
return the cached residual.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

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


@contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """The model in eager attention, the only path that computes attention weights; restored on exit."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextmanager
def weights_per_layer(adapter: BoundAdapter, reduce: Callable[[int, torch.Tensor], None]) -> Iterator[None]:
    """Hand each layer's attention weights (batch, heads, T, T) to `reduce(layer, weights)` inside the layer,
    then drop them from the module's output, so at most one layer's exist at a time.

    `output_attentions=True` keeps every layer's weights until the forward ends (30 layers x 9 heads x T^2
    for SmolLM2; 32 x 32 x T^2 for an 8B model, 34 GB at T = 1,024 for a batch of 8). Needs eager attention."""
    def hook(module: nn.Module, args: tuple, output: Any, layer: int = 0) -> Any:
        if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
            raise RuntimeError(f"{type(module).__name__} returned no attention weights (not eager attention)")
        reduce(layer, output[1])
        return (output[0], None, *output[2:])

    handles = [adapter.attention(layer).register_forward_hook(lambda m, a, o, _layer=layer: hook(m, a, o, _layer))
               for layer in range(adapter.n_layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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


@contextmanager
def block_inputs(adapter: BoundAdapter) -> Iterator[list[torch.Tensor]]:
    """Collect each decoder block's input (the residual stream before it), detached, per layer."""
    blocks = adapter.blocks
    store: list[torch.Tensor] = [torch.empty(0)] * len(blocks)

    def keep(module: nn.Module, args: tuple, kwargs: dict, layer: int = 0) -> None:
        store[layer] = (args[0] if args else kwargs["hidden_states"]).detach()

    handles = [block.register_forward_pre_hook(lambda m, a, k, _l=i: keep(m, a, k, _l), with_kwargs=True)
               for i, block in enumerate(blocks)]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


class _Replay(nn.Module):
    """Stands in for a skipped block: returns the cached residual (the next block's input)."""

    def __init__(self, resid: torch.Tensor) -> None:
        super().__init__()
        self.resid = resid

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.resid


@contextmanager
def resumed_at(adapter: BoundAdapter, layer: int, resid: torch.Tensor) -> Iterator[None]:
    """Forwards inside skip blocks < layer; block `layer` gets `resid` (B', T, d_model) as input."""
    blocks = adapter.blocks
    saved = [blocks[i] for i in range(layer)]
    try:
        for i in range(layer):
            blocks[i] = _Replay(resid)
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block
