"""Built-in, seeded probe sets. Every choice (sampler, seed, N, BOS) goes into the run config."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def bos_id(tokenizer: Any) -> int:
    """The id a sequence starts with: BOS, else EOS (GPT-2 style models use it as BOS)."""
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sequences with")


def sampleable_ids(tokenizer: Any, n_vocab: int) -> torch.Tensor:
    """Token ids to draw random tokens from: the tokenizer's range without special tokens."""
    upper = min(len(tokenizer), n_vocab)
    keep = torch.ones(upper, dtype=torch.bool)
    special = [i for i in tokenizer.all_special_ids if i < upper]
    keep[special] = False
    return keep.nonzero().squeeze(1)


def repeated_tokens(tokenizer: Any, n_vocab: int, n: int = 50, batch: int = 10,
                    seed: int = 0) -> torch.Tensor:
    """BOS + X + X with X uniform over non-special ids: (batch, 1 + 2n)."""
    pool = sampleable_ids(tokenizer, n_vocab)
    gen = torch.Generator().manual_seed(seed)
    x = pool[torch.randint(len(pool), (batch, n), generator=gen)]
    bos = torch.full((batch, 1), bos_id(tokenizer), dtype=torch.long)
    return torch.cat([bos, x, x], dim=1)


def repeated_half_loss(model: Any, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Mean next-token loss on the repeated half of BOS+X+X, per sequence: (batch,).

    Predictions made at positions n+1 .. 2n-1 (targets n+2 .. 2n) can be copied by induction.
    """
    logits = model(tokens.to(model.device)).logits.float()  # (b, T, vocab)
    pred = logits[:, n + 1: 2 * n]
    target = tokens[:, n + 2: 2 * n + 1].to(pred.device)
    loss = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return loss.view(target.shape).mean(dim=1)


def encode_batch(lm: Any, texts: list[str], side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """BOS + tokens, padded: (ids (b, T), attention mask (b, T)); left padding for generation."""
    bos = bos_id(lm.tokenizer)
    seqs = [[bos, *lm.tokenizer.encode(t, add_special_tokens=False)] for t in texts]
    width = max(len(s) for s in seqs)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else bos
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, span] = torch.tensor(s)
        mask[i, span] = 1
    return ids, mask


# Text that follows other text: SentencePiece tokenizers with a dummy prefix (Llama-2, Mistral v0.1)
# encode " Mary" on its own as ['▁', '▁Mary'] (the prefix adds a '▁' and the space is another), though
# inside a sentence it is the one token '▁Mary'. Encoding a piece after a reference context and
# dropping the context's ids gives the in-sentence tokens on every tokenizer.
_CONTEXT = "a"


def encode_after(tokenizer: Any, text: str, context: str = _CONTEXT) -> list[int]:
    """The ids `text` has where it follows other text (no dummy prefix, no stray '▁'); plain
    `encode` when the context's ids are not a prefix of the joint encoding (a merge across the
    boundary: then the piece has no separate tokens to give)."""
    head = tokenizer.encode(context, add_special_tokens=False)
    joint = tokenizer.encode(context + text, add_special_tokens=False)
    if joint[:len(head)] == head and len(joint) > len(head):
        return list(joint[len(head):])
    return list(tokenizer.encode(text, add_special_tokens=False))


def adds_dummy_prefix(tokenizer: Any) -> bool:
    """Whether encoding text on its own prepends a word boundary (SentencePiece's dummy prefix):
    " x" alone then takes more tokens than " x" after other text."""
    return len(tokenizer.encode(" a", add_special_tokens=False)) > len(encode_after(tokenizer, " a"))
