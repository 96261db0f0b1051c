"""The KV-budget attention (workers/kv_budget.py): full heads are attention as the model computes it,
streaming heads see only sink + recent keys, in prefill and decode alike."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from atlas.errors import BadInput
from tests.tiny import TINY_CONFIGS, save_tiny
from workers.kv_budget import Budget, budgeted, check_model

SLIDING = {"Gemma2ForCausalLM", "Gemma3ForCausalLM"}  # refused by the check; the attention itself still runs


def _load(tmp_path, architecture: str) -> Any:
    from workers.models import load, resolve

    return load(resolve(str(save_tiny(tmp_path / architecture, architecture))), "cpu")


def _full(lm: Any, rows: int, value: bool) -> torch.Tensor:
    return torch.full((rows, lm.adapter.n_layers, lm.adapter.n_kv_heads), value)


PROMPT = [[1, 5, 17, 33, 8, 41, 9, 12, 60, 7, 22, 3]]


@pytest.mark.parametrize("architecture", sorted(TINY_CONFIGS))
def test_every_head_full_is_the_models_own_attention(architecture, tmp_path):
    lm = _load(tmp_path, architecture)
    ids = torch.tensor(PROMPT)
    lm.model.set_attn_implementation("eager")
    with torch.no_grad():
        reference = lm.model(ids).logits
        with budgeted(lm.model, Budget(_full(lm, 1, True), sink=1, recent=2)):
            ours = lm.model(ids).logits
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()


def test_streaming_heads_cannot_read_outside_sink_and_window(tmp_path):
    """3 layers, sink 1, recent 2: position 2 reaches at most position 2 + 3 through streaming heads, so the
    last position's logits ignore it; one full KV head is enough for it to matter again."""
    lm = _load(tmp_path, "LlamaForCausalLM")
    a, b = torch.tensor(PROMPT), torch.tensor(PROMPT)
    b[0, 2] = 70
    streaming = _full(lm, 1, False)
    one_full = streaming.clone()
    one_full[0, 1, 0] = True
    with torch.no_grad():
        with budgeted(lm.model, Budget(streaming, sink=1, recent=2)):
            same = (lm.model(a).logits[0, -1], lm.model(b).logits[0, -1])
            near = (lm.model(a).logits[0, 4], lm.model(b).logits[0, 4])  # within reach: it changes
        with budgeted(lm.model, Budget(one_full, sink=1, recent=2)):
            far = (lm.model(a).logits[0, -1], lm.model(b).logits[0, -1])
    assert torch.allclose(*same, atol=1e-6)
    assert not torch.allclose(*near, atol=1e-4)
    assert not torch.allclose(*far, atol=1e-4)


def test_decode_steps_see_what_prefill_sees_and_rows_keep_their_own_heads(tmp_path):
    """Decoding from a cache gives the logits a full prefill gives at that position, per batch row, each
    row under its own choice of full heads (row 0 all streaming, row 1 all full)."""
    from workers.kv_cache import new_cache, with_cache

    lm = _load(tmp_path, "LlamaForCausalLM")
    full = torch.stack([_full(lm, 1, False)[0], _full(lm, 1, True)[0]])
    ids = torch.tensor(PROMPT * 2)
    with torch.no_grad(), budgeted(lm.model, Budget(full, sink=1, recent=3)):
        whole = lm.model(ids).logits[:, -1]
        cache = new_cache(lm.model)
        lm.model(ids[:, :-1], **with_cache(lm.model, cache))
        step = lm.model(ids[:, -1:], **with_cache(lm.model, cache)).logits[:, -1]
    assert torch.allclose(step, whole, atol=1e-4)
    assert not torch.allclose(whole[0], whole[1], atol=1e-4)


def test_sliding_window_models_are_refused_with_a_reason(tmp_path):
    lm = _load(tmp_path, "Gemma3ForCausalLM")
    with pytest.raises(BadInput, match="sliding-window"):
        check_model(lm.model)


def test_needle_recalls_score_each_choice(tmp_path):
    from workers.families.retrieval.needles import build_tests
    from workers.kv_budget import needle_recalls

    lm = _load(tmp_path, "LlamaForCausalLM")
    texts = (" ".join(f"w{(7 * i) % 90}." for i in range(400)),)
    tests = build_tests(lm.tokenizer, texts, [96], [50.0])[:2]
    out = needle_recalls(lm, tests, {"full": _full(lm, 1, True)[0], "none": _full(lm, 1, False)[0]},
                         sink=2, recent=8, max_new=3)
    assert set(out) == {"full", "none"} and all(len(v) == 2 and all(0 <= r <= 1 for r in v) for v in out.values())
