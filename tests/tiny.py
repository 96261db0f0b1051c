"""Tiny random-weight models, one per supported architecture, built from configs (no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 96
SPECIALS = ["<pad>", "<bos>", "<eos>"]

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

TINY_CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "LlamaForCausalLM": (tf.LlamaConfig, _COMMON),
    "MistralForCausalLM": (tf.MistralConfig, {**_COMMON, "sliding_window": None}),
    "Qwen2ForCausalLM": (tf.Qwen2Config, _COMMON),
    "Qwen3ForCausalLM": (tf.Qwen3Config, {**_COMMON, "head_dim": 8}),
    "Gemma2ForCausalLM": (tf.Gemma2Config, {**_COMMON, "head_dim": 8, "sliding_window": 16}),
    "Gemma3ForCausalLM": (tf.Gemma3TextConfig, {**_COMMON, "head_dim": 16, "sliding_window": 16,
                                                "layer_types": ["sliding_attention", "sliding_attention",
                                                                "full_attention"]}),
    "Phi3ForCausalLM": (tf.Phi3Config, {**_COMMON, "pad_token_id": 0}),
    "GPT2LMHeadModel": (tf.GPT2Config, dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4,
                                            n_positions=256)),
    "GPTNeoXForCausalLM": (tf.GPTNeoXConfig, dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=3, num_attention_heads=4,
                                                  max_position_embeddings=256)),
}


def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    words = SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                      pad_token="<pad>")


def tiny_model(architecture: str, seed: int = 0) -> torch.nn.Module:
    config_cls, kwargs = TINY_CONFIGS[architecture]
    torch.manual_seed(seed)
    config = config_cls(**kwargs, bos_token_id=1, eos_token_id=2)
    config.architectures = [architecture]
    model = getattr(tf, architecture)(config)
    # Random init gives near-uniform attention; larger weights make heads distinct.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "wte" not in name:
                param.mul_(4.0)
    return model.eval()


def save_tiny(directory: Path, architecture: str = "LlamaForCausalLM", seed: int = 0) -> Path:
    """A local model directory (safetensors + tokenizer) like one downloaded from the hub."""
    directory.mkdir(parents=True, exist_ok=True)
    tiny_model(architecture, seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
