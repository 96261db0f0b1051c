"""Per-step argmax probe for greedy decoding, without full attention matrices.

Wu et al. (arXiv 2404.15574) ask, at every decode step, where each head's attention peaks. Their
code requests `output_attentions` from a forked modeling file; here one attention function is
registered in transformers' `AttentionInterface` under PROBE_IMPL. It is a wrapper:

- with q_len > 1 (prefill) it is plain sdpa: the fast path, O(T) memory on CPU and GPU;
- with q_len = 1 (a decode step) and a probe attached to the attention module, it computes the
  row of logits q.K^T * scale (+ softcap) + mask over the cache, per query head, GQA aware (query
  head h reads KV head h // group, as `repeat_kv` lays them out), keeps the argmax, and lets sdpa
  compute the real output. That row is (batch, heads, 1, T): linear in T.
- a probe can also zero the query of chosen heads on decode steps (Wu et al.'s masking): the
  head then attends uniformly to every visible key, so it outputs the mean of the values.

Argmax over logits equals argmax over the softmax, so no softmax is needed. Sliding-window layers
(Gemma 2/3, Mistral v0.1): their cache holds only the last W keys, so key index j is not the
absolute position. Positions are stored as distance back from the current token (K - 1 - j),
which means the same thing in full and sliding layers; `absolute()` turns them into positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PROBE_IMPL = "head_atlas_probe"
_ATTR = "_head_atlas_probe"


@dataclass
class DecodeProbe:
    """State shared with the attention function while attached to a model.

    record: keep the per-head argmax at each decode step.
    mask: {layer: [query heads]} whose query is zeroed on decode steps (uniform attention).
    row_mask: the same per batch row, so several masks decode side by side in one batch.
    back: {layer: (batch, n_heads) long}, argmax distance back from the current token, last step.
    """

    record: bool = True
    mask: dict[int, list[int]] = field(default_factory=dict)
    row_mask: dict[int, torch.Tensor] = field(default_factory=dict)  # {layer: (batch, n_heads) bool}, per row
    back: dict[int, torch.Tensor] = field(default_factory=dict)

    def absolute(self, n_layers: int, total_len: int) -> torch.Tensor:
        """Argmax positions of the last step, (n_layers, batch, n_heads); total_len includes the query."""
        return total_len - 1 - torch.stack([self.back[layer] for layer in range(n_layers)])


def decode_logits(query: torch.Tensor, key: torch.Tensor, scaling: float,
                  mask: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    """One decode step's attention logits, (batch, n_heads, K), float32.

    query: (batch, n_heads, 1, d); key: (batch, n_kv, K, d); mask: None, bool (True = attend) or
    additive float, broadcastable to (batch, 1 or n_heads, 1, >= K).
    """
    b, n_heads, _, d = query.shape
    n_kv, k_len = key.shape[1], key.shape[2]
    q = query.float().view(b, n_kv, n_heads // n_kv, d)  # head h -> kv h // group, like repeat_kv
    logits = torch.einsum("bkgd,bktd->bkgt", q, key.float()).reshape(b, n_heads, k_len) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if mask is not None:
        m = mask[..., -1, :k_len]  # (batch, 1|heads, K): the query row
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
    return logits


def _softmax_output(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Attention output from decode logits (batch, H, K) and value (batch, n_kv, K, d): (batch, 1, H, d)."""
    b, n_heads, k_len = logits.shape
    n_kv, d = value.shape[1], value.shape[-1]
    probs = logits.softmax(-1).view(b, n_kv, n_heads // n_kv, k_len)
    out = torch.einsum("bkgt,bktd->bkgd", probs, value.float()).reshape(b, n_heads, 1, d)
    return out.transpose(1, 2).to(value.dtype)


def _chunked_softcap(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None, scaling: float, softcap: float,
                     chunk: int = 256) -> torch.Tensor:
    """Prefill for softcapped models (Gemma 2), which sdpa cannot do: eager in query blocks.

    query: (b, H, T, d); returns (b, T, H, d). Memory O(chunk * K) per head, not O(T^2).
    """
    n_heads, t = query.shape[1], query.shape[2]
    k_len = key.shape[2]
    group = n_heads // key.shape[1]
    k_rep = key.repeat_interleave(group, 1).float()  # (b, H, K, d)
    v_rep = value.repeat_interleave(group, 1).float()
    out = []
    for start in range(0, t, chunk):
        q = query[:, :, start:start + chunk].float()
        logits = torch.tanh(q @ k_rep.transpose(2, 3) * scaling / softcap) * softcap  # (b, H, c, K)
        if mask is not None:
            m = mask[:, :, start:start + chunk, :k_len]
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
        else:  # causal, queries aligned to the end of the keys
            rows = torch.arange(start, start + q.shape[2])[:, None] + (k_len - t)
            logits = logits.masked_fill(torch.arange(k_len)[None, :] > rows, float("-inf"))
        out.append(logits.softmax(-1) @ v_rep)
    return torch.cat(out, 2).transpose(1, 2).to(query.dtype)


def probe_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None,
                    softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered attention function; returns (output (b, q_len, H, d), None) like sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if scaling is None:
        d_head = _head_dim(module)
        if d_head is None:
            raise ValueError(f"{type(module).__name__} has neither head_dim nor head_size to scale by")
        scaling = d_head ** -0.5
    probe: DecodeProbe | None = getattr(module, _ATTR, None)
    if probe is None or query.shape[2] != 1:
        if softcap is not None:
            return _chunked_softcap(module, query, key, value, attention_mask, scaling, softcap), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    masked = probe.mask.get(module.layer_idx)
    if masked:
        query = query.clone()
        query[:, masked] = 0.0  # uniform attention over the visible keys
    rows = probe.row_mask.get(module.layer_idx)
    if rows is not None:
        query = query.masked_fill(rows[:, :, None, None].to(query.device), 0.0)
    if probe.record or softcap is not None:
        logits = decode_logits(query, key, scaling, attention_mask, softcap)  # (b, H, K)
        if probe.record:
            probe.back[module.layer_idx] = key.shape[2] - 1 - logits.argmax(-1)
        if softcap is not None:
            return _softmax_output(logits, value), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register() -> None:
    """Register PROBE_IMPL with transformers (idempotent); its masks are built like sdpa's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PROBE_IMPL, probe_attention)
    AttentionMaskInterface.register(PROBE_IMPL, sdpa_mask)


def _head_dim(module: Any) -> int | None:
    """d_head of an attention module: `head_dim` in most families, `head_size` in GPT-NeoX."""
    return getattr(module, "head_dim", None) or getattr(module, "head_size", None)


def attention_modules(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every module with a layer_idx that calls the attention interface."""
    for module in model.modules():
        if hasattr(module, "layer_idx") and _head_dim(module) and hasattr(module, "scaling"):
            yield module


@contextmanager
def attached(model: PreTrainedModel, probe: DecodeProbe) -> Iterator[DecodeProbe]:
    """Switch the model to PROBE_IMPL and attach `probe`; restores both on exit."""
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE_IMPL)
    modules = list(attention_modules(model))
    for module in modules:
        setattr(module, _ATTR, probe)
    try:
        yield probe
    finally:
        for module in modules:
            if hasattr(module, _ATTR):
                delattr(module, _ATTR)
        model.set_attn_implementation(previous)


def mask_map(heads: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    """[(layer, head), ...] -> {layer: sorted heads}."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    return {layer: sorted(set(heads)) for layer, heads in by_layer.items()}
