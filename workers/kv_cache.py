"""KV caches for the families' own prefill and decode loops (retrieval, the pursuit editing check).

transformers' DynamicLayer grows by `torch.cat` on every step, so decoding n tokens after a T-token
prompt copies the whole cache n times: on a 1,024-token needle prompt that copying was 60% of a
decode step (torch.profiler, 10 rows, SmolLM2). `GrowingLayer` keeps keys and values in a buffer
with spare room and writes each step in place; it grows the buffer (by an eighth, at least 64
positions) only when full. Sliding-window layers keep transformers' own class.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into a buffer with room to grow."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if not self._fits(key_states, length + new):
            self._grow(key_states, value_states, length + new)
        key_buffer, value_buffer = self._key_buffer, self._value_buffer
        assert key_buffer is not None and value_buffer is not None
        key_buffer[..., length:length + new, :] = key_states
        value_buffer[..., length:length + new, :] = value_states
        keys, values = key_buffer[..., :length + new, :], value_buffer[..., :length + new, :]
        self.keys, self.values = keys, values
        return keys, values

    def reserve(self, keys: torch.Tensor, values: torch.Tensor, rows: int, headroom: int) -> None:
        """Empty buffers for `rows` rows shaped like a row of `keys`/`values`, filled by `write_rows`."""
        length = keys.shape[-2]
        self.lazy_initialization(keys, values)
        key_buffer = keys.new_empty((rows, *keys.shape[1:-2], length + headroom, keys.shape[-1]))
        value_buffer = values.new_empty((rows, *values.shape[1:-2], length + headroom, values.shape[-1]))
        self._key_buffer, self._value_buffer = key_buffer, value_buffer
        self.keys = key_buffer[..., :length, :]
        self.values = value_buffer[..., :length, :]

    def write_rows(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Rows `row`.. of the cache <- the rows of a cache of the same length."""
        own_keys, own_values = self.keys, self.values
        assert own_keys is not None and own_values is not None, "write_rows before reserve"
        own_keys[row:row + len(keys)] = keys
        own_values[row:row + len(values)] = values

    def _fits(self, states: torch.Tensor, needed: int) -> bool:
        """The buffer still backs `keys` (crop keeps it; batch reshuffles and resets replace it) and
        has room for `needed` positions of the same rows, heads and dtype."""
        buffer = self._key_buffer
        if buffer is None or buffer.shape[-2] < needed or buffer.dtype != states.dtype:
            return False
        if buffer.shape[:-2] != states.shape[:-2] or buffer.shape[-1] != states.shape[-1]:
            return False
        keys = self.keys  # set by lazy_initialization, which update runs first
        assert keys is not None
        return keys.numel() == 0 or keys.data_ptr() == buffer.data_ptr()

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        capacity = needed + max(64, needed // 8)
        length = self.get_seq_length()
        buffers = []
        for old, states in ((self.keys, key_states), (self.values, value_states)):
            buffer = states.new_empty((*states.shape[:-2], capacity, states.shape[-1]))
            if length:  # get_seq_length is 0 until keys and values hold something
                assert old is not None
                buffer[..., :length, :] = old
            buffers.append(buffer)
        self._key_buffer, self._value_buffer = buffers


def new_cache(model: PreTrainedModel) -> DynamicCache:
    """A DynamicCache for `model` whose full-attention layers grow in place (`GrowingLayer`)."""
    kv = DynamicCache(config=model.config)
    kv.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in kv.layers]
    if kv.layer_class_to_replicate is DynamicLayer:  # a config without layer types: layers appear lazily
        kv.layer_class_to_replicate = GrowingLayer
    return kv


@cache
def _cache_keyword(forward: Callable[..., Any]) -> str:
    """The forward's name for the cache: `cache` since transformers 5.2x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def with_cache(model: PreTrainedModel, kv: Any) -> dict[str, Any]:
    """Keyword arguments passing `kv` to `model`'s forward under the installed version's name."""
    return {_cache_keyword(type(model).forward): kv, "use_cache": True}


def _attention_layer(layer: object) -> CacheLayerMixin:
    """A cache layer that holds keys and values (not a linear-attention or placeholder layer)."""
    if not isinstance(layer, CacheLayerMixin):
        raise ValueError(f"a {type(layer).__name__} cache layer holds no keys and values to stack")
    return layer


def keys_values(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A filled cache layer's keys and values."""
    attention = _attention_layer(layer)
    keys, values = attention.keys, attention.values
    if keys is None or values is None:
        raise ValueError(f"a {type(layer).__name__} cache layer is empty: nothing to stack")
    return keys, values


def stacked(model: PreTrainedModel, parts: Iterable[DynamicCache], n_rows: int, headroom: int) -> DynamicCache:
    """One cache holding the rows of `parts` (caches of one length) in order, `n_rows` in all, with room
    for `headroom` more positions. Each part is copied straight into place as it comes (a cache that is
    refilled between parts, like a prefix cache, can be passed every time), not gathered and
    concatenated, so the peak is the stacked cache, not twice it. Sliding-window layers (transformers'
    own class) are concatenated at the end."""
    kv = new_cache(model)
    row = 0
    sliding: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for part in parts:
        for i, source in enumerate(part.layers):
            keys, values = keys_values(source)
            layer = kv.layers[i]
            if not isinstance(layer, GrowingLayer):
                sliding.setdefault(i, []).append((keys.clone(), values.clone()))
                _attention_layer(layer).cumulative_length = getattr(source, "cumulative_length", 0)
                continue
            if row == 0:
                layer.reserve(keys, values, n_rows, headroom)
            layer.write_rows(row, keys, values)
        row += keys_values(part.layers[0])[0].shape[0]
    if row != n_rows:
        raise ValueError(f"stacked {row} rows into a cache of {n_rows}")
    for i, pieces in sliding.items():
        layer = _attention_layer(kv.layers[i])
        layer.lazy_initialization(pieces[0][0], pieces[0][1])
        layer.keys = torch.cat([k for k, _ in pieces])
        layer.values = torch.cat([v for _, v in pieces])
    return kv
