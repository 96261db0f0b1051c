"""Memory-aware minibatches (workers/batching.py): shapes from configs, free memory, and the fit."""

from __future__ import annotations

import pytest

from workers.batching import (
    Shape,
    dtype_bytes,
    eager_attention_bytes,
    fit,
    forward_bytes,
    free_bytes,
    kv_cache_bytes,
    patterns_batch,
)

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "max_position_embeddings": 131072, "tie_word_embeddings": False}


def test_shape_counts_llama_8b_parameters() -> None:
    s = Shape.from_config(LLAMA_8B)
    assert (s.n_layers, s.d_head, s.n_kv_heads) == (32, 128, 8)
    assert s.params == pytest.approx(8.03e9, rel=0.01)  # Llama-3.1-8B has 8.03 B parameters


def test_shape_reads_gpt2_names_and_nested_text_configs() -> None:
    gpt2 = Shape.from_config({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
                              "n_positions": 1024, "tie_word_embeddings": True})
    assert (gpt2.d_ff, gpt2.mlp_matrices, gpt2.context) == (3072, 2, 1024)
    assert gpt2.params == pytest.approx(124e6, rel=0.02)  # GPT-2 small (position embeddings left out)
    nested = Shape.from_config({"model_type": "gemma3", "text_config": LLAMA_8B})
    assert nested == Shape.from_config(LLAMA_8B)


def test_free_memory_comes_from_the_host_or_the_override(monkeypatch) -> None:
    monkeypatch.delenv("HEAD_ATLAS_MEMORY_BYTES", raising=False)
    assert free_bytes("cpu") > 2**20
    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", "12345")
    assert free_bytes("cpu") == 12345


def test_fit_uses_half_the_free_memory_and_never_returns_zero(monkeypatch) -> None:
    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", str(1000))
    assert fit(64, 100) == 5  # 500 bytes of room
    assert fit(64, 100, fixed=300) == 2
    assert fit(3, 1) == 3  # never more than asked for
    assert fit(64, 10**9) == 1  # at least one: an out-of-memory error then halves nothing, and fails clearly
    assert fit(64, 100, budget=1000) == 10


def test_bf16_halves_the_kv_cache_and_eager_attention_is_quadratic() -> None:
    s = Shape.from_config(LLAMA_8B)
    assert dtype_bytes("bfloat16") == 2 and dtype_bytes("torch.float32") == 4
    assert kv_cache_bytes(s, 1024, 2) == 32 * 2 * 8 * 128 * 1024 * 2  # 128 MiB per 1,024-token row
    assert eager_attention_bytes(s, 2048, 2) == pytest.approx(4 * eager_attention_bytes(s, 1024, 2))
    logits = s.vocab * 4  # one kept logit row, float32
    assert forward_bytes(s, 2048, 2) - logits == pytest.approx(2 * (forward_bytes(s, 1024, 2) - logits))


def test_8b_patterns_at_headvis_length_fit_a_140gb_gpu(monkeypatch) -> None:
    """HeadVis's 512-token sequences on Llama-3.1-8B in bf16, one layer's attention at a time: with the 124 GB an
    H200 has beside the weights, over a hundred sequences go in one forward; at 8 GB, a few still do."""

    class Model:
        class config:  # stands in for a PretrainedConfig
            pass

    for key, value in LLAMA_8B.items():
        setattr(Model.config, key, value)
    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", str(124e9))
    big = patterns_batch(Model, "cuda", "bfloat16", 511, 16384)
    monkeypatch.setenv("HEAD_ATLAS_MEMORY_BYTES", str(8e9))
    small = patterns_batch(Model, "cuda", "bfloat16", 511, 16384)
    assert big >= 128 and 1 <= small < big
