"""A built-in indirect-object-identification (IOI) prompt set, templated from name lists.

Wang et al. (arXiv 2211.00593): in "When Mary and John went to the store, John gave a drink to",
the model should say the indirect object (IO, " Mary") rather than the subject (S, " John").
The logit difference logit(IO) - logit(S) at the last position measures the behaviour.

Every clean prompt has a corrupted counterpart with the same template, length and first two names
but a third name at the second subject position (the paper's p_ABC): it carries no information
about which name is the IO, so resample ablation from it removes the IOI signal.

Names are single tokens with a leading space in the model's tokenizer; a tokenizer that has fewer
than four such names (tiny test tokenizers) gets random vocabulary tokens as names, recorded in
the provenance. Sequences are BOS + prompt, right-padded to a common length; causal attention
means padding after a prompt's last token cannot change anything at or before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from workers.probes import bos_id, encode_after, sampleable_ids

NAMES = ("Mary", "John", "Tom", "James", "Anna", "Paul", "Sarah", "David", "Kate", "Mark", "Lisa",
         "Peter", "Emma", "George", "Laura", "Michael", "Alice", "Daniel", "Rose", "Sam", "Jack",
         "Linda", "Steve", "Susan", "Robert", "Helen", "Eric", "Amy", "Frank", "Julia", "Brian", "Grace")
PLACES = ("store", "park", "school", "office", "station", "garden", "restaurant", "hospital")
OBJECTS = ("drink", "book", "ring", "ball", "letter", "bag", "gift", "key")
# {A} = IO, {B} = S (twice), {P} = place, {O} = object; the prompt ends where the IO is due.
TEMPLATES = (
    "When {A} and {B} went to the {P}, {B} gave a {O} to",
    "When {B} and {A} went to the {P}, {B} gave a {O} to",
    "Then, {A} and {B} went to the {P}. {B} gave a {O} to",
    "After {B} and {A} had lunch at the {P}, {B} handed the {O} to",
    "While {A} and {B} were working at the {P}, {B} gave a {O} to",
    "Friends {B} and {A} found a {O} at the {P}. {B} gave it to",
)


@dataclass
class IOISet:
    tokens: torch.Tensor  # (N, T) long, BOS + clean prompt, right-padded
    corrupted: torch.Tensor  # (N, T) long, the ABC counterpart, same length per prompt
    last: torch.Tensor  # (N,) index of each prompt's last real token (where the IO is predicted)
    io: torch.Tensor  # (N,) IO token id
    s: torch.Tensor  # (N,) S token id
    valid: torch.Tensor  # (N, T) bool, real (non-padding) tokens
    provenance: dict[str, Any] = field(default_factory=dict)


def single_token_names(tokenizer: Any) -> list[tuple[str, int]]:
    """Names that are one non-special token with a leading space inside a sentence (a dummy-prefix
    SentencePiece tokenizer encodes " Mary" on its own as ['▁', '▁Mary']: `encode_after`)."""
    special = set(tokenizer.all_special_ids)
    found = []
    for name in NAMES:
        ids = encode_after(tokenizer, " " + name)
        if len(ids) == 1 and ids[0] not in special:
            found.append((" " + name, ids[0]))
    return found


def _encode(tokenizer: Any, template: str, fills: dict[str, int], words: dict[str, str]) -> list[int]:
    """Encode a template piece by piece so that each name is exactly its single token; every piece
    after the first is encoded as it reads mid-sentence (no dummy-prefix '▁' before " and")."""
    ids: list[int] = []
    text = template.replace("{P}", words["P"]).replace("{O}", words["O"])
    for piece in text.replace("{", "\x00{").replace("}", "}\x00").split("\x00"):
        if piece.startswith("{") and piece.endswith("}"):
            ids.append(fills[piece[1:-1]])
        elif piece:
            piece = piece.rstrip(" ")
            ids += encode_after(tokenizer, piece) if ids else tokenizer.encode(piece, add_special_tokens=False)
    return ids


def ioi_prompts(tokenizer: Any, n_vocab: int, n_prompts: int = 24, seed: int = 0) -> IOISet:
    """N seeded IOI prompts with their ABC counterparts (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    names = single_token_names(tokenizer)
    source = "single-token names from workers.families.ablation.ioi.NAMES"
    if len(names) < 4:
        pool = sampleable_ids(tokenizer, n_vocab)
        picks = pool[torch.randperm(len(pool), generator=gen)[:16]].tolist()
        names = [(tokenizer.decode([i]), i) for i in picks]
        source = "random vocabulary tokens (the tokenizer has < 4 single-token names)"
    bos = bos_id(tokenizer)
    clean, corrupt, io, s = [], [], [], []
    for i in range(n_prompts):
        template = TEMPLATES[i % len(TEMPLATES)]
        a, b, c = (names[j][1] for j in torch.randperm(len(names), generator=gen)[:3].tolist())
        words = {"P": PLACES[int(torch.randint(len(PLACES), (), generator=gen))],
                 "O": OBJECTS[int(torch.randint(len(OBJECTS), (), generator=gen))]}
        clean_ids = _encode(tokenizer, template, {"A": a, "B": b}, words)
        # ABC: the second subject mention becomes a third name.
        second = template.rfind("{B}")
        abc = template[:second] + "{C}" + template[second + 3:]
        corrupt_ids = _encode(tokenizer, abc, {"A": a, "B": b, "C": c}, words)
        assert len(clean_ids) == len(corrupt_ids)
        clean.append([bos, *clean_ids])
        corrupt.append([bos, *corrupt_ids])
        io.append(a)
        s.append(b)
    width = max(len(p) for p in clean)
    tokens = torch.full((n_prompts, width), bos, dtype=torch.long)
    corrupted = tokens.clone()
    valid = torch.zeros(n_prompts, width, dtype=torch.bool)
    for i, (p, q) in enumerate(zip(clean, corrupt, strict=True)):
        tokens[i, : len(p)] = torch.tensor(p)
        corrupted[i, : len(q)] = torch.tensor(q)
        valid[i, : len(p)] = True
    last = valid.sum(1) - 1
    provenance = {"n_prompts": n_prompts, "seed": seed, "templates": len(TEMPLATES), "names": source,
                  "n_names": len(names), "corrupted": "ABC: third name at the second S position",
                  "padding": "right, with the BOS id"}
    return IOISet(tokens, corrupted, last, torch.tensor(io), torch.tensor(s), valid, provenance)


def logit_diff(logits: torch.Tensor, io: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """logit(IO) - logit(S) per prompt. logits: (N, vocab) at each prompt's last token -> (N,)."""
    return logits.gather(1, io[:, None]).squeeze(1) - logits.gather(1, s[:, None]).squeeze(1)
