"""Every registered adapter, on a tiny random model of its architecture: the per-head split is exact."""

from __future__ import annotations

import pytest
import torch

from tests.tiny import TINY_CONFIGS, VOCAB, tiny_model
from workers.adapters import ADAPTERS
from workers.hooks import capture_z, edit_z, scale_heads


def test_every_adapter_has_a_tiny_config() -> None:
    assert set(ADAPTERS) == set(TINY_CONFIGS)


@pytest.fixture(params=sorted(ADAPTERS))
def bound(request):
    model = tiny_model(request.param)
    return ADAPTERS[request.param].bind(model)


def _tokens() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def test_head_outputs_sum_to_the_projection(bound) -> None:
    tokens = _tokens()
    outputs: dict[int, torch.Tensor] = {}
    hooks = [bound.out_proj(layer).register_forward_hook(
        lambda mod, args, out, layer=layer: outputs.__setitem__(layer, out.detach()))
        for layer in range(bound.n_layers)]
    with capture_z(bound) as zs, torch.no_grad():
        bound.model(tokens)
    for hook in hooks:
        hook.remove()
    for layer in range(bound.n_layers):
        per_head = bound.head_outputs(layer, zs[layer])  # (b, p, h, d_model)
        bias = bound.b_o(layer)
        total = per_head.sum(2) + (bias if bias is not None else 0)
        torch.testing.assert_close(total, outputs[layer], rtol=1e-4, atol=1e-5)


def test_w_write_and_write_scale_give_what_reaches_the_residual_stream(bound) -> None:
    """z W_write, scaled per token by write_scale and summed over heads, is what attention adds to
    the residual stream: the post-attention norm's output (Gemma 2/3), else the projection's."""
    for layer in range(bound.n_layers):  # a non-trivial post-norm gain, so a missing fold would show
        post = bound.post_attn_norm(layer)
        if post is not None:
            with torch.no_grad():
                post.weight.copy_(torch.linspace(-0.5, 2.0, post.weight.shape[0]))
    added: dict[int, torch.Tensor] = {}
    hooks = [(bound.post_attn_norm(layer) or bound.out_proj(layer)).register_forward_hook(
        lambda mod, args, out, layer=layer: added.__setitem__(layer, out.detach()))
        for layer in range(bound.n_layers)]
    with capture_z(bound) as zs, torch.no_grad():
        bound.model(_tokens())
    for hook in hooks:
        hook.remove()
    for layer in range(bound.n_layers):
        z = zs[layer].float()
        scale = bound.write_scale(layer, z)
        per_head = torch.einsum("bphk,hkd->bphd", z * (1 if scale is None else scale[..., None, None]),
                                bound.w_write(layer))
        bias = bound.b_o(layer) if scale is None else None
        total = per_head.sum(2) + (bias if bias is not None else 0)
        torch.testing.assert_close(total, added[layer].float(), rtol=1e-4, atol=1e-5)


def test_zeroing_a_head_changes_only_later_layers(bound) -> None:
    tokens = _tokens()
    with torch.no_grad():
        clean = bound.model(tokens, output_hidden_states=True).hidden_states
        with edit_z(bound, scale_heads([(1, 0)], 0.0)):
            ablated = bound.model(tokens, output_hidden_states=True).hidden_states
    # hidden_states[i] is the residual entering block i; block 1 writes into hidden_states[2].
    for i in range(2):
        torch.testing.assert_close(clean[i], ablated[i])
    assert not torch.allclose(clean[2], ablated[2])
    assert not torch.allclose(clean[-1], ablated[-1])


def test_gqa_map(bound) -> None:
    group = bound.n_heads // bound.n_kv_heads
    assert [bound.kv_head(h) for h in range(bound.n_heads)] == [h // group for h in range(bound.n_heads)]
