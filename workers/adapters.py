"""Architecture adapters: where each head's pieces live in a Hugging Face module tree.

Mostly data, one entry per architecture family, registered once and keyed by the HF class name.
A head's z is the input of the attention output projection, split [batch, pos, head, d_head];
its write into the residual stream is z_h @ W_O^h, and the sum over heads plus the bias is the
projection's output (tests check this for every entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class ArchitectureAdapter:
    family: str
    layers: str  # dotted path to the ModuleList of blocks
    attention: str  # attribute of a block holding the attention module
    out_proj: str  # attribute of the attention module: the W_O projection
    final_norm: str  # dotted path from the root model
    unembed: str  # dotted path from the root model
    conv1d: bool = False  # GPT-2's Conv1D stores W as [in, out]
    post_attn_norm: str | None = None  # attribute of a block: a norm on the attention output (Gemma 2/3)

    def bind(self, model: PreTrainedModel) -> BoundAdapter:
        return BoundAdapter(self, model)


def _get(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


class _Projection(Protocol):
    """The attention output projection's parameters: nn.Linear, or GPT-2's Conv1D (same names)."""

    weight: torch.Tensor
    bias: torch.Tensor | None


class _Paths(TypedDict):
    layers: str
    attention: str
    out_proj: str
    final_norm: str
    unembed: str


_DECODER: _Paths = dict(layers="model.layers", attention="self_attn", out_proj="o_proj",
                        final_norm="model.norm", unembed="lm_head")

ADAPTERS: dict[str, ArchitectureAdapter] = {
    "LlamaForCausalLM": ArchitectureAdapter("llama", **_DECODER),
    "MistralForCausalLM": ArchitectureAdapter("mistral", **_DECODER),
    "Qwen2ForCausalLM": ArchitectureAdapter("qwen2", **_DECODER),
    "Qwen3ForCausalLM": ArchitectureAdapter("qwen3", **_DECODER),
    "Gemma2ForCausalLM": ArchitectureAdapter("gemma2", **_DECODER, post_attn_norm="post_attention_layernorm"),
    "Gemma3ForCausalLM": ArchitectureAdapter("gemma3", **_DECODER, post_attn_norm="post_attention_layernorm"),
    "Phi3ForCausalLM": ArchitectureAdapter("phi3", **_DECODER),
    "GPT2LMHeadModel": ArchitectureAdapter(
        "gpt2", layers="transformer.h", attention="attn", out_proj="c_proj",
        final_norm="transformer.ln_f", unembed="lm_head", conv1d=True),
    "GPTNeoXForCausalLM": ArchitectureAdapter(
        "gpt_neox", layers="gpt_neox.layers", attention="attention", out_proj="dense",
        final_norm="gpt_neox.final_layer_norm", unembed="embed_out"),
}


def adapter_for(class_name: str) -> ArchitectureAdapter | None:
    return ADAPTERS.get(class_name)


class BoundAdapter:
    """An adapter bound to one loaded model: modules, head counts, W_O slices, GQA map."""

    def __init__(self, spec: ArchitectureAdapter, model: PreTrainedModel) -> None:
        self.spec = spec
        self.model = model
        cfg: Any = model.config  # head counts live under architecture-specific names (GPT-2: n_head)
        self.n_layers = len(self.blocks)
        self.n_heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
        self.n_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        w = self._projection(0).weight
        in_features = w.shape[0] if spec.conv1d else w.shape[1]
        self.d_head: int = in_features // self.n_heads
        self.d_model: int = w.shape[1] if spec.conv1d else w.shape[0]

    @cached_property
    def blocks(self) -> nn.ModuleList:
        return cast(nn.ModuleList, _get(self.model, self.spec.layers))

    def attention(self, layer: int) -> nn.Module:
        return getattr(self.blocks[layer], self.spec.attention)

    def out_proj(self, layer: int) -> nn.Module:
        return getattr(self.attention(layer), self.spec.out_proj)

    def _projection(self, layer: int) -> _Projection:
        """out_proj(layer), typed by the parameters read off it."""
        return getattr(self.attention(layer), self.spec.out_proj)

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.spec.final_norm)

    @property
    def unembed(self) -> nn.Linear:
        """The unembedding (an nn.Linear in every supported architecture), from transformers' own
        accessor: attribute names move between releases (GPT-NeoX's `embed_out` is `lm_head` in 5.x);
        the spec's path is the fallback."""
        found = self.model.get_output_embeddings()
        return cast(nn.Linear, found if found is not None else _get(self.model, self.spec.unembed))

    def post_attn_norm(self, layer: int) -> nn.Module | None:
        """The norm between the attention output and the residual stream, if the architecture has one.

        With it (Gemma 2/3) a head's write is gamma * (z_h W_O^h) / rms(sum over heads): the gain
        turns directions, the rms is one scalar per token shared by the layer's heads."""
        name = self.spec.post_attn_norm
        return getattr(self.blocks[layer], name) if name else None

    def w_write(self, layer: int) -> torch.Tensor:
        """W_O into the residual stream, (n_heads, d_head, d_model): W_O with a post-attention norm's
        gain folded in; pair it with `write_scale` for that norm's per-token 1/rms."""
        w_o = self.w_o(layer).detach().float()
        post = self.post_attn_norm(layer)
        return w_o if post is None else w_o * norm_gain(post, self.d_model).to(w_o.device)

    def write_scale(self, layer: int, z: torch.Tensor) -> torch.Tensor | None:
        """The post-attention norm's per-token factor 1 / rms(attention output), (batch, pos); None
        without such a norm. z: (batch, pos, n_heads, d_head) as the hooks give it."""
        norm = self.post_attn_norm(layer)
        if norm is None:
            return None
        proj = self._projection(layer)
        out = torch.nn.functional.linear(z.reshape(*z.shape[:2], -1), proj.weight, proj.bias).float()  # no hooks
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
        return out.square().mean(-1).add(eps).rsqrt()

    def write_input(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """z (batch, pos, n_heads, d_head) such that z @ w_write(layer) is each head's real write into the
        residual stream: scaled by the post-attention norm's per-token 1/rms where there is one (Gemma
        2/3), unchanged elsewhere. Every family that reads head writes from z goes through here."""
        scale = self.write_scale(layer, z)
        return z if scale is None else z * scale[..., None, None].to(z.dtype)

    def kv_head(self, head: int) -> int:
        return head // (self.n_heads // self.n_kv_heads)

    def w_o(self, layer: int) -> torch.Tensor:
        """Per-head output matrices, (n_heads, d_head, d_model)."""
        w = self._projection(layer).weight
        w_in_out = w if self.spec.conv1d else w.T  # (n_heads * d_head, d_model)
        return w_in_out.reshape(self.n_heads, self.d_head, self.d_model)

    def b_o(self, layer: int) -> torch.Tensor | None:
        return getattr(self.out_proj(layer), "bias", None)

    def split_heads(self, z: torch.Tensor) -> torch.Tensor:
        """(batch, pos, n_heads * d_head) -> (batch, pos, n_heads, d_head), a view."""
        return z.view(*z.shape[:-1], self.n_heads, self.d_head)

    def head_outputs(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Each head's write into the residual stream: (batch, pos, n_heads, d_model).

        z is split (batch, pos, n_heads, d_head), as capture_z gives it, or merged (batch, pos, n_heads * d_head).
        """
        if z.dim() == 3:
            z = self.split_heads(z)
        return torch.einsum("bphd,hdm->bphm", z, self.w_o(layer))


def norm_gain(norm: nn.Module, d_model: int) -> torch.Tensor:
    """gamma of a norm, (d_model,), read off the module: works for LayerNorm, RMSNorm and Gemma's
    (1 + w) RMSNorm. A zero-mean, unit-RMS +-1 input x gives norm(x) - norm(0) = gamma * x."""
    x = torch.ones(d_model)
    x[1::2] = -1.0
    if d_model % 2:
        return norm.get_parameter("weight").detach().float().cpu()
    param = next(norm.parameters())
    with torch.inference_mode():
        probe = torch.stack([x, torch.zeros(d_model)]).to(param.device, param.dtype)
        out = norm(probe).float().cpu()
    return (out[0] - out[1]) * x
