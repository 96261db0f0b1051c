"""Does a retrieval-head KV budget keep what it claims? Full KV for chosen heads, sink + window for the rest.

DuoAttention (arXiv 2410.10819), RazorAttention (2407.15891) and HeadKV (2410.19258) keep the full KV cache
for a few heads (retrieval heads) and a constant-size one for the others: the first `sink` tokens and the
`recent` latest. Here that cache is simulated exactly by a mask: one attention function, registered in
transformers' AttentionInterface, lets a streaming KV head's query heads see key j from query i only if
j < sink or i - recent < j <= i, in prefill and in decode alike (what a cache holding those tokens gives);
full heads see every earlier key. Each batch row can carry its own choice of full heads, so several
choices decode one needle prompt side by side.

`needle_recalls` runs the retrieval family's needle tests (workers/families/retrieval) greedily under each
choice and scores each answer by ROUGE-1 recall, as that family does. bench/bench_kv_budget.py compares
the heads `atlas export --format duoattention` labels full against as many random KV heads.

Limits: the mask makes attention cost what full attention costs (this measures accuracy, not speed or
memory); models with sliding-window layers are refused (their cache drops keys, so key index is not
position); biases and everything else run as the model does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from atlas.errors import BadInput

IMPL = "head_atlas_kv_budget"
_ATTR = "_head_atlas_kv_budget"
QUERY_CHUNK = 512  # query rows per attention block: bounds the (rows, heads, chunk, keys) logits


@dataclass
class Budget:
    """full: (rows, n_layers, n_kv_heads) bool, True = that KV head keeps its whole cache in that batch row."""

    full: torch.Tensor
    sink: int
    recent: int


def allowed_keys(q_len: int, k_len: int, sink: int, recent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(causal, streaming), each (q_len, k_len) bool, for queries at the last q_len of k_len positions."""
    q_pos = torch.arange(k_len - q_len, k_len)[:, None]
    k_pos = torch.arange(k_len)[None, :]
    causal = k_pos <= q_pos
    return causal, causal & ((k_pos < sink) | (k_pos > q_pos - recent))


def budget_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The registered attention function: (output (b, q_len, H, dh), None), like sdpa's.

    query (b, H, L, dh), key / value (b, KV, S, dh); GQA: query head h reads KV head h // (H / KV)."""
    budget: Budget | None = getattr(module, _ATTR, None)
    b, n_heads, q_len, d_head = query.shape
    k_len, group = key.shape[2], n_heads // key.shape[1]
    scale = scaling if scaling is not None else d_head ** -0.5
    k = key.repeat_interleave(group, 1).float()
    v = value.repeat_interleave(group, 1).float()
    causal, streaming = allowed_keys(q_len, k_len, budget.sink if budget else 0, budget.recent if budget else 1)
    full = None
    if budget is not None:  # (b, H, 1, 1): this row's query head belongs to a full KV head
        full = budget.full[:, module.layer_idx].repeat_interleave(group, -1)[:, :, None, None].to(query.device)
    out = []
    for start in range(0, q_len, QUERY_CHUNK):
        stop = min(q_len, start + QUERY_CHUNK)
        logits = query[:, :, start:stop].float() @ k.transpose(-1, -2) * scale  # (b, H, chunk, S)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        allowed = causal[start:stop].to(query.device).expand(b, n_heads, -1, -1)
        if full is not None:
            allowed = allowed & (full | streaming[start:stop].to(query.device))
        if attention_mask is not None:
            mask = attention_mask[:, :, start:stop, :k_len]
            if mask.dtype == torch.bool:
                allowed = allowed & mask
            else:
                logits = logits + mask.float()
        window = kwargs.get("sliding_window")
        if window:
            q_pos = torch.arange(k_len - q_len + start, k_len - q_len + stop, device=query.device)[:, None]
            allowed = allowed & (torch.arange(k_len, device=query.device)[None, :] > q_pos - window)
        out.append(logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v)
    return torch.cat(out, 2).transpose(1, 2).contiguous().to(query.dtype), None


def register() -> None:
    """Register IMPL with transformers (idempotent); no mask function: budget_attention builds its own
    causal mask (sdpa's may be None when the prompt is causal)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPL, budget_attention)
    AttentionMaskInterface.register(IMPL, sdpa_mask)


def check_model(model: Any) -> None:
    """Refuse models whose cache does not keep every position (sliding-window layers)."""
    config = model.config
    sliding = getattr(config, "sliding_window", None) or "sliding_attention" in (getattr(config, "layer_types",
                                                                                         None) or ())
    if sliding:
        raise BadInput(f"{type(model).__name__} has sliding-window layers: their cache drops keys, so the "
                       "streaming mask cannot be placed by position", "check a full-attention model (e.g. llama)")


@contextmanager
def budgeted(model: Any, budget: Budget) -> Iterator[Budget]:
    """Switch the model to the budget attention with `budget` attached to every attention module."""
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPL)
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")]
    for module in modules:
        setattr(module, _ATTR, budget)
    try:
        yield budget
    finally:
        for module in modules:
            if hasattr(module, _ATTR):
                delattr(module, _ATTR)
        model.set_attn_implementation(previous)


def greedy(lm: Any, ids: list[int], rows: int, max_new: int, stops: list[int]) -> list[list[int]]:
    """Greedy decode `rows` copies of one prompt (each row under its own budget row); tokens per row,
    up to its first stop token."""
    from workers.kv_cache import new_cache, with_cache

    cache = new_cache(lm.model)
    prompt = torch.tensor([ids[:-1]] * rows, device=lm.device)
    lm.model(prompt, logits_to_keep=1, **with_cache(lm.model, cache))
    current = torch.tensor([[ids[-1]]] * rows, device=lm.device)
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for _ in range(max_new):
        tokens = lm.model(current, **with_cache(lm.model, cache)).logits[:, -1].argmax(-1).tolist()
        for row, token in enumerate(tokens):
            if done[row]:
                continue
            if token in stops:
                done[row] = True
            else:
                out[row].append(token)
        if all(done):
            break
        current = torch.tensor(tokens, device=lm.device)[:, None]
    return out


def needle_recalls(lm: Any, tests: list[Any], choices: dict[str, torch.Tensor], sink: int, recent: int,
                   max_new: int) -> dict[str, list[float]]:
    """ROUGE-1 recall of each needle test's answer under each choice of full KV heads ({name: (n_layers,
    n_kv_heads) bool}); every choice decodes the same prompt as its own batch row."""
    from workers.families.retrieval import stop_ids
    from workers.families.retrieval.needles import rouge1_recall

    check_model(lm.model)
    names = list(choices)
    budget = Budget(torch.stack([choices[n] for n in names]).bool(), sink, recent)
    stops = stop_ids(lm.tokenizer)
    out: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode(), budgeted(lm.model, budget):
        for test in tests:
            for name, generated in zip(names, greedy(lm, test.ids, len(names), max_new, stops), strict=True):
                out[name].append(rouge1_recall(test.needle.answer, lm.tokenizer.decode(generated)))
    return out
