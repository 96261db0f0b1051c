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
    # Qwen2Tokenizer is byte-level BPE: its vocabulary holds the 256 byte symbols (see byte_level_tokenizer)
    "Qwen2ForCausalLM": (tf.Qwen2Config, {**_COMMON, "vocab_size": 384}),
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


# Architectures whose tokenizer class transformers 5 picks from the config and rebuilds from the vocabulary
# and merges (Qwen2Tokenizer: byte-level BPE); a word-level tokenizer.json loads as it and encodes to no ids.
BYTE_LEVEL = ("Qwen2ForCausalLM",)
# Qwen2's pre-tokenizer splits every digit off ("w12" -> "w", "1", "2"), so no w-word is one token there:
# words made of letters that the byte-level tokenizer learns as single tokens (" alpha" -> "Ġalpha").
LETTER_WORDS = ("alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta", "lambda", "zeta")


def byte_level_tokenizer() -> tf.PreTrainedTokenizerFast:
    """Byte-level BPE trained here (deterministic, no download) on the tiny vocabulary's words, so that
    " w12" is one token as in the word-level tokenizer; 384 ids at most (the tiny Qwen2 config's vocab)."""
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [" ".join(words)] * 4 + [" " + " ".join(words[::-1])] * 4 + [" " + " ".join(LETTER_WORDS)] * 20
    tok.train_from_iterator(text, trainer)
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
    (byte_level_tokenizer() if architecture in BYTE_LEVEL else tiny_tokenizer()).save_pretrained(directory)
    return directory


# -- a SentencePiece-style tokenizer with a dummy prefix (Llama-2, Mistral v0.1/0.2) ---------------
SP_VOCAB = 640
SP_SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def sentencepiece_corpus() -> list[str]:
    """Text the dummy-prefix tokenizer is trained on: the IOI names and templates, needle and concept
    words, so that the probes' words are single tokens (as in a real vocabulary)."""
    from workers.families.ablation.ioi import NAMES, OBJECTS, PLACES, TEMPLATES
    from workers.families.retrieval.needles import NEEDLES, QUESTION_TEMPLATE

    lines = []
    for i, name in enumerate(NAMES):
        fills = {"A": name, "B": NAMES[(i + 1) % len(NAMES)], "P": PLACES[i % len(PLACES)],
                 "O": OBJECTS[i % len(OBJECTS)]}
        lines += [t.format(**fills) for t in TEMPLATES] * 2
    for needle in NEEDLES:
        lines += [needle.sentence, QUESTION_TEMPLATE.format(question=needle.question)] * 4
    lines += ["The cat sat on the mat. A dog ran in the park. Red blue green yellow."] * 10
    return [line.replace("\n", " ") for line in lines]  # a newline is only ever a byte token


def sentencepiece_tokenizer() -> tf.PreTrainedTokenizerFast:
    """BPE with byte fallback behind Llama-2's legacy normalizer (prepend '▁', spaces to '▁': the dummy
    prefix): " Mary" alone encodes as ['▁', '▁Mary'] and "\\n" as the byte token <0x0A>, as Llama-2's
    tokenizer does. Trained here (deterministic), no download."""
    from tokenizers import decoders, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    # SentencePiece never merges across a word boundary: each '▁' starts a piece ("▁▁Mary": '▁', '▁Mary')
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    corpus = sentencepiece_corpus()
    letters = sorted({c for line in corpus for c in line} | {"\u2581"})
    trainer = trainers.BpeTrainer(vocab_size=SP_VOCAB, special_tokens=SP_SPECIALS + BYTE_TOKENS,
                                  initial_alphabet=letters, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_sentencepiece_llama(directory: Path, seed: int = 0) -> Path:
    """A tiny Llama directory whose tokenizer adds a dummy prefix (see `sentencepiece_tokenizer`)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = sentencepiece_tokenizer()
    config_cls, kwargs = TINY_CONFIGS["LlamaForCausalLM"]
    torch.manual_seed(seed)
    config = config_cls(**{**kwargs, "vocab_size": len(tokenizer)}, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    config.architectures = ["LlamaForCausalLM"]
    tf.LlamaForCausalLM(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
