"""The decode-step argmax probe against full eager attention weights, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from tests.tiny import tiny_model
from workers.families.retrieval.decode_probe import DecodeProbe, attached, decode_logits, mask_map

# Llama: GQA (4 query heads, 2 KV heads); Gemma 3: sliding-window layers (window 16 < prompt);
# Gemma 2: sliding window and attention-logit softcapping; Qwen2: biases on q/k/v.
ARCHS = ["LlamaForCausalLM", "Gemma3ForCausalLM", "Gemma2ForCausalLM", "Qwen2ForCausalLM"]
PROMPT, STEPS = 40, 8


def _probe_decode(model: torch.nn.Module, ids: torch.Tensor, probe: DecodeProbe,
                  steps: int = STEPS) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decode through the probe; returns (full sequence (1, T + steps), argmax per step)."""
    n_layers = model.config.num_hidden_layers
    argmax = []
    with torch.inference_mode(), attached(model, probe):
        cache = DynamicCache(config=model.config)
        model(ids[:, :-1], past_key_values=cache)
        seq, current = ids, ids[:, -1:]
        for _ in range(steps):
            logits = model(current, past_key_values=cache).logits
            if probe.record:
                argmax.append(probe.absolute(n_layers, seq.shape[1])[:, 0])  # (layers, heads)
            current = logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, current], 1)
    return seq, argmax


def _prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_argmax_matches_full_eager_weights(arch: str) -> None:
    """Same argmax for every layer, head and step as eager output_attentions; same greedy tokens."""
    model = tiny_model(arch)
    ids = _prompt()
    seq, argmax = _probe_decode(model, ids, DecodeProbe(record=True))
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        for step, got in enumerate(argmax):
            out = model(seq[:, :PROMPT + step], output_attentions=True)
            want = torch.stack([a[0, :, -1].argmax(-1) for a in out.attentions])  # (layers, heads)
            assert torch.equal(got, want), f"step {step}"
            # the probe only reads: its greedy token is eager's greedy token
            assert int(out.logits[0, -1].argmax()) == int(seq[0, PROMPT + step])
    if arch == "Gemma3ForCausalLM":  # sliding layers really were cropped: positions are absolute
        assert model.config.sliding_window < PROMPT
        assert argmax[-1][0].min() >= PROMPT + STEPS - 1 - model.config.sliding_window


def test_gqa_mapping_and_mask() -> None:
    """decode_logits: query head h reads KV head h // group; masked keys never win."""
    torch.manual_seed(0)
    query, key = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 10, 8)
    logits = decode_logits(query, key, 0.5, None, None)  # (1, 4, 10)
    for h in range(4):
        want = (query[0, h, 0] @ key[0, h // 2].T) * 0.5
        assert torch.allclose(logits[0, h], want, atol=1e-6)
    mask = torch.ones(1, 1, 1, 10, dtype=torch.bool)
    mask[..., logits[0, 0].argmax()] = False
    masked = decode_logits(query, key, 0.5, mask, None)
    assert masked[0, 0].argmax() != logits[0, 0].argmax()


def test_masked_head_attends_uniformly() -> None:
    """Zeroing a head's query on decode steps gives the mean of its KV head's values (Wu et al.)."""
    from workers.adapters import ArchitectureAdapter
    from workers.hooks import capture_z

    model = tiny_model("LlamaForCausalLM")
    adapter = ArchitectureAdapter("llama", layers="model.layers", attention="self_attn", out_proj="o_proj",
                                  final_norm="model.norm", unembed="lm_head").bind(model)
    layer, head = 1, 3
    ids = _prompt(1)
    probe = DecodeProbe(record=False, mask=mask_map([(layer, head)]))
    with torch.inference_mode(), attached(model, probe):
        cache = DynamicCache(config=model.config)
        model(ids[:, :-1], past_key_values=cache)
        with capture_z(adapter, [layer]) as z:
            model(ids[:, -1:], past_key_values=cache)
        values = cache.layers[layer].values  # (1, n_kv, T, d), includes the decode step's value
    want = values[0, adapter.kv_head(head)].mean(0)
    assert torch.allclose(z[layer][0, -1, head], want, atol=1e-5)
    assert not torch.allclose(z[layer][0, -1, head - 1], values[0, adapter.kv_head(head - 1)].mean(0), atol=1e-3)


def test_detached_model_is_plain_sdpa() -> None:
    """After the context the model is back on its own attention and logits are unchanged."""
    model = tiny_model("LlamaForCausalLM")
    before = model.config._attn_implementation
    ids = _prompt(2)
    with torch.inference_mode():
        ref = model(ids).logits
        with attached(model, DecodeProbe()):
            probed = model(ids).logits
        after = model(ids).logits
    assert model.config._attn_implementation == before
    assert torch.allclose(ref, probed, atol=1e-5) and torch.allclose(ref, after)
