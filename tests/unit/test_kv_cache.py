"""The in-place KV cache against transformers' own DynamicCache: same logits, step by step."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from tests.tiny import TINY_CONFIGS, tiny_model
from workers.kv_cache import GrowingLayer, new_cache, with_cache


def _greedy(model: torch.nn.Module, kv: DynamicCache, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    logits = [model(ids, **with_cache(model, kv)).logits[:, -1]]
    for _ in range(steps):
        logits.append(model(logits[-1].argmax(-1, keepdim=True), **with_cache(model, kv)).logits[:, -1])
    return logits


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_decoding_matches_dynamic_cache(arch: str) -> None:
    model = tiny_model(arch)
    ids = torch.randint(3, 90, (3, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = _greedy(model, DynamicCache(config=model.config), ids, 70)  # 70 > the first headroom (64)
        kv = new_cache(model)
        got = _greedy(model, kv, ids, 70)
    for want, have in zip(reference, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    growing = [layer for layer in kv.layers if isinstance(layer, GrowingLayer)]
    assert growing or arch == "Gemma2ForCausalLM"  # Gemma 2: every layer sliding in the tiny config
    assert all(layer.get_seq_length() == 100 for layer in growing)


def test_crop_extend_and_batch_reshuffles_keep_the_cache_right() -> None:
    """What the retrieval prefix cache and the editing check do: crop back, extend, repeat rows."""
    model = tiny_model("LlamaForCausalLM")
    ids = torch.randint(3, 90, (1, 40), generator=torch.Generator().manual_seed(1))
    other = torch.cat([ids[:, :25], torch.randint(3, 90, (1, 15), generator=torch.Generator().manual_seed(2))], 1)
    with torch.inference_mode():
        kv = new_cache(model)
        model(ids, **with_cache(model, kv))
        kv.crop(25 - kv.get_seq_length())  # keep the shared prefix, write the new suffix over the old one
        model(other[:, 25:-1], **with_cache(model, kv))
        kv.batch_repeat_interleave(3)
        got = model(other[:, -1:].repeat(3, 1), **with_cache(model, kv)).logits[:, -1]
        want = model(other.repeat(3, 1)).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
