"""Memory-aware minibatches: how many sequences go through one forward, from the model's shape, the
sequence length and the memory free on the device (not a fixed CPU-sized default).

A minibatch is an execution detail: it never enters a run's config or hash, and every family that uses
it gives the same numbers whatever it picks (the per-sequence values are concatenated, in order). Out of
memory still falls back by halving (`scaled_batch`, the retry in workers/unit.py), which this makes rare.

Torch is imported lazily (only to ask CUDA how much is free), so workers/cost.py can share the
per-sequence estimates below without importing torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

#: share of the free device memory a family may plan to fill; the rest is for the allocator's
#: fragmentation, temporaries the estimates leave out, and other processes on a CPU host
MEMORY_FRACTION = 0.5
#: HEAD_ATLAS_MEMORY_BYTES overrides the detected free memory (tests; a shared GPU)
MEMORY_ENV = "HEAD_ATLAS_MEMORY_BYTES"


@dataclass(frozen=True)
class Shape:
    """The sizes that set a forward's memory and FLOPs, read from a Hugging Face config (a dict or a
    PretrainedConfig); torch-free, so the cost model can use it on a config.json alone."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_ff: int
    vocab: int
    context: int
    tied: bool = False
    sliding_window: int | None = None
    mlp_matrices: int = 3  # gated MLPs (Llama, Gemma, Qwen) have three d_model x d_ff matrices; GPT-2 style two

    @classmethod
    def from_config(cls, config: Any) -> Shape:
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
        text = get("text_config")  # multimodal wrappers keep the decoder's sizes under text_config
        if text is not None and get("num_hidden_layers") is None:
            return cls.from_config(text)

        def first(*keys: str, default: Any = None) -> Any:
            for key in keys:
                value = get(key)
                if value is not None:
                    return value
            return default

        d_model = int(first("hidden_size", "n_embd", "d_model"))
        n_heads = int(first("num_attention_heads", "n_head"))
        d_head = int(first("head_dim", default=d_model // n_heads))
        return cls(n_layers=int(first("num_hidden_layers", "n_layer")), d_model=d_model, n_heads=n_heads,
                   n_kv_heads=int(first("num_key_value_heads", default=n_heads)), d_head=d_head,
                   d_ff=int(first("intermediate_size", "n_inner", default=4 * d_model)),
                   vocab=int(first("vocab_size")),
                   context=int(first("max_position_embeddings", "n_positions", default=2048)),
                   tied=bool(first("tie_word_embeddings", default=False)),
                   sliding_window=first("sliding_window"),
                   mlp_matrices=2 if first("model_type") in ("gpt2", "gpt_neox") else 3)

    @property
    def block_params(self) -> int:
        """Weights in the decoder blocks (attention + MLP), the part every token multiplies."""
        attn = self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = self.mlp_matrices * self.d_model * self.d_ff
        return self.n_layers * (attn + mlp)

    @property
    def params(self) -> int:
        """Every weight: blocks, the embedding and (untied) the unembedding."""
        return self.block_params + self.vocab * self.d_model * (1 if self.tied else 2)


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a dtype given as a torch dtype or its name ('bfloat16', 'float32', ...)."""
    name = str(dtype).removeprefix("torch.")
    return 2 if name in ("bfloat16", "float16", "half", "bf16", "fp16") else 4


def free_bytes(device: Any = "cpu") -> int:
    """Memory free now on `device`: CUDA's own count on a GPU, MemAvailable from /proc/meminfo on a CPU
    host (psutil elsewhere); HEAD_ATLAS_MEMORY_BYTES, when set, wins."""
    override = os.environ.get(MEMORY_ENV)
    if override:
        return int(float(override))
    if str(device).startswith("cuda"):
        import torch

        index = torch.device(device).index
        free, _total = torch.cuda.mem_get_info(torch.cuda.current_device() if index is None else index)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def fit(wanted: int, per_item: float, *, fixed: float = 0.0, device: Any = "cpu",
        fraction: float = MEMORY_FRACTION, budget: float | None = None) -> int:
    """How many of `wanted` items (sequences, decode rows) to run at once: as many as fit
    `fraction` of the free memory after `fixed` bytes, at `per_item` bytes each; at least 1."""
    room = (free_bytes(device) * fraction if budget is None else budget) - fixed
    if per_item <= 0:
        return max(1, wanted)
    return max(1, min(wanted, int(room // per_item)))


# -- per-sequence memory of the forwards the families run -------------------------------------------
def forward_bytes(shape: Shape, length: int, elem: int, logits_rows: int = 1) -> float:
    """Activations one sequence of `length` tokens holds at the peak of a no-grad forward: a few residual-
    sized tensors, one layer's MLP intermediate (gate, up, product), q/k/v, and the logits it keeps."""
    residual = 4 * shape.d_model
    mlp = 3 * shape.d_ff
    qkv = shape.d_head * (shape.n_heads + 2 * shape.n_kv_heads)
    return float(length * (residual + mlp + qkv) * elem + logits_rows * shape.vocab * 4)


def eager_attention_bytes(shape: Shape, length: int, elem: int) -> float:
    """One layer's eager attention for one sequence: scores, their float32 softmax and the cast back
    (H x T x T each), plus the float32 copy and the three detector products the pattern scores make."""
    square = shape.n_heads * length * length
    return float(square * (elem + 4 + elem) + square * 4 * 4)


def kv_cache_bytes(shape: Shape, length: int, elem: int) -> float:
    """One row's KV cache over `length` tokens, every layer (sliding layers counted in full: an upper bound)."""
    return float(shape.n_layers * 2 * shape.n_kv_heads * shape.d_head * length * elem)


def captured_z_bytes(shape: Shape, length: int) -> float:
    """The lens family's per-sequence capture: every layer's z (float32 after the head-space reduction
    casts it) plus one layer's next-token rows in head space and the unembedding rows they come from."""
    z_all = shape.n_layers * length * shape.n_heads * shape.d_head * 4
    per_layer = length * (2 * shape.n_heads * shape.d_head + shape.d_model) * 4
    return float(z_all + per_layer)


def ablation_copy_bytes(shape: Shape, rows: int, length: int, positions: int, elem: int) -> float:
    """One stacked copy of an ablation probe (workers/families/ablation/exact.py): the resumed forward's
    activations for the probe's `rows` sequences of `length` tokens, and the logits kept at `positions`
    per row twice over (in the model's dtype, and the float32 copy the metrics read)."""
    return rows * forward_bytes(shape, length, elem, logits_rows=2 * positions)


def model_shape(model: Any) -> Shape:
    """The Shape of a loaded Hugging Face model."""
    return Shape.from_config(model.config)


def patterns_batch(model: Any, device: Any, dtype: Any, length: int, wanted: int) -> int:
    """Sequences per eager forward for the patterns family: one layer's attention weights at a time
    (they are reduced to scores inside the layer, workers/families/patterns.py) plus the forward."""
    shape, elem = model_shape(model), dtype_bytes(dtype)
    return fit(wanted, forward_bytes(shape, length, elem) + eager_attention_bytes(shape, length, elem), device=device)


def lens_batch(model: Any, device: Any, dtype: Any, length: int, wanted: int) -> int:
    """Windows per forward for the lens family: the forward plus every layer's captured z."""
    shape, elem = model_shape(model), dtype_bytes(dtype)
    return fit(wanted, forward_bytes(shape, length, elem) + captured_z_bytes(shape, length), device=device)


def decode_rows(model: Any, device: Any, dtype: Any, length: int, wanted: int) -> int:
    """Prompts of `length` tokens decoded side by side: one KV cache row each, plus one prefill's activations."""
    shape, elem = model_shape(model), dtype_bytes(dtype)
    return fit(wanted, kv_cache_bytes(shape, length, elem), fixed=forward_bytes(shape, length, elem), device=device)


def editing_settings(model: Any, device: Any, dtype: Any, prompts: int, length: int, new_tokens: int,
                     wanted: int) -> int:
    """Settings per prefill and decode batch of the pursuit editing check, each setting `prompts` rows: a
    row's KV cache over its prompt and continuation, the float32 logits after the prompt twice (kept, and
    the decode's), and its share of the prefill's activations."""
    shape, elem = model_shape(model), dtype_bytes(dtype)
    per_row = kv_cache_bytes(shape, length + new_tokens, elem) + forward_bytes(shape, length, elem, logits_rows=2)
    return fit(wanted, prompts * per_row, device=device)


def loss_settings(model: Any, device: Any, dtype: Any, windows: int, length: int, wanted: int) -> int:
    """Settings per forward of the editing check's corpus loss, each setting `windows` rows of `length`
    tokens: the forward and its logits at every position three times over (the model's, the shifted copy
    the cross-entropy reads, and its log-softmax; measured on a 128k vocabulary)."""
    shape, elem = model_shape(model), dtype_bytes(dtype)
    return fit(wanted, windows * forward_bytes(shape, length, elem, logits_rows=3 * length), device=device)
