"""Needle-in-a-haystack probe set: built-in needles, haystacks from a corpus, prompts with known spans.

Protocol after Wu et al. (arXiv 2404.15574, `retrieval_head_detection.py`), which follows Kamradt's
needle test: the haystack is cut to fit the target length, the needle goes after the last sentence
end before the depth point (at the very start for depth 0, at the end for depth 100), and the
prompt asks "Based on the content of the book, Question: {q}\\nAnswer:". The prompt is assembled
from token ids, so the answer span [b, e) is known exactly; Wu et al. rebuild the text and find
it again by token-set overlap > 0.9 (`find_span` does the same, to check).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from workers.probes import adds_dummy_prefix, bos_id, encode_after


@dataclass(frozen=True)
class Needle:
    """A sentence = prefix + answer + suffix; the question is answered by copying the answer."""

    name: str
    prefix: str
    answer: str
    suffix: str
    question: str

    @property
    def sentence(self) -> str:
        return f"{self.prefix}{self.answer}{self.suffix}"


# Written for head-atlas: facts no model can know, answers long enough (10-20 tokens) to score.
NEEDLES: tuple[Needle, ...] = (
    Needle("rosa_soup", " The secret ingredient in Grandma Rosa's winter soup is ",
           "a spoonful of smoked paprika and a handful of roasted chestnuts", ".",
           "What is the secret ingredient in Grandma Rosa's winter soup?"),
    Needle("marrow_lighthouse", " The lighthouse keeper on Marrow Island owns ",
           "a brass telescope, a blue bicycle and a grey parrot named Captain Pickles", ".",
           "What does the lighthouse keeper on Marrow Island own?"),
    Needle("oslo_walk", " The best thing to do in Oslo on a rainy day is to ",
           "visit the old ship museum and then drink hot chocolate by the harbour", ".",
           "What is the best thing to do in Oslo on a rainy day?"),
)

QUESTION_TEMPLATE = "\n\nBased on the content of the book, Question: {question}\nAnswer:"


def rouge1_recall(reference: str, candidate: str) -> float:
    """ROUGE-1 recall: clipped unigram overlap / reference unigrams, in [0, 1].

    Tokens are lowercase alphanumeric runs (rouge_score's tokenizer); no stemming, unlike Wu et
    al.'s `use_stemmer=True`, which only matters for inflected near-misses.
    """
    ref = Counter(re.findall(r"[a-z0-9]+", reference.lower()))
    cand = Counter(re.findall(r"[a-z0-9]+", candidate.lower()))
    total = sum(ref.values())
    return sum(min(n, cand[w]) for w, n in ref.items()) / total if total else 0.0


def find_span(ids: list[int], answer_ids: list[int], overlap: float = 0.9) -> tuple[int, int] | None:
    """Wu et al.'s locator: the first window whose token-id set overlaps the answer's by > overlap."""
    target, n = set(answer_ids), len(answer_ids)
    for start in range(len(ids) - n + 1):
        if len(set(ids[start:start + n]) & target) / len(target) > overlap:
            return start, start + n
    return None


@dataclass
class NeedleTest:
    """One prompt: ids (T,) as a list, the answer span [span[0], span[1]), and its grid point."""

    needle: Needle
    length: int
    depth: float
    ids: list[int]
    span: tuple[int, int]

    @property
    def answer_ids(self) -> list[int]:
        return self.ids[self.span[0]:self.span[1]]


def stop_ids(tokenizer: Any) -> list[int]:
    """Ids that end an answer: EOS, chat end-of-turn, and newline tokens (Wu et al. stop at '\\n'):
    byte-level BPE's 'Ċ', a plain '\\n', and SentencePiece's byte token <0x0A> (Llama-2, Mistral),
    found by what "\\n" encodes to mid-text as well as by name."""
    ids = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if i is not None}
    ids |= {i for tok, i in tokenizer.get_vocab().items()
            if tok.strip(" \u0120\u2581") in ("\n", "\u010a", "\u010a\u010a", "<0x0A>")}
    newline = encode_after(tokenizer, "\n")
    if len(newline) == 1:
        ids.add(newline[0])
    unk = tokenizer.unk_token_id
    return sorted(i for i in ids if i != unk)


def haystack_ids(texts: tuple[str, ...], tokenizer: Any, n_tokens: int) -> list[int]:
    """The corpus as one token stream (paragraphs joined by blank lines), at least n_tokens long.
    With a dummy-prefix tokenizer a paragraph after the first is encoded as it reads after a blank
    line (no word-start '▁' the joined text would not have)."""
    ids: list[int] = []
    dummy = adds_dummy_prefix(tokenizer)
    for text in texts:
        ids += (encode_after(tokenizer, text + "\n\n", "a\n\n") if ids and dummy
                else tokenizer.encode(text + "\n\n", add_special_tokens=False))
        if len(ids) >= n_tokens:
            break
    if not ids:
        raise ValueError("the corpus has no text for a haystack")
    while len(ids) < n_tokens:  # Wu et al. repeat their chapter until it is long enough
        ids = ids + ids
    return ids


def depth_grid(n_depths: int = 10) -> list[float]:
    """Insertion depths in percent: Wu et al.'s round(linspace(0, 100, 10))."""
    return [float(d) for d in np.round(np.linspace(0, 100, n_depths))]


def length_grid(max_length: int, n_lengths: int, min_length: int) -> list[int]:
    """Prompt lengths in tokens, evenly spaced like Wu et al.'s linspace(1000, 50000, 20)."""
    if n_lengths <= 1 or min_length >= max_length:
        return [max_length]
    return [int(x) for x in np.round(np.linspace(min_length, max_length, n_lengths))]


class PromptBuilder:
    """Token-level prompt assembly for one tokenizer: plain text, or the chat template if asked."""

    def __init__(self, tokenizer: Any, chat: bool) -> None:
        self.tokenizer = tokenizer
        self.chat = chat and getattr(tokenizer, "chat_template", None) is not None
        enc = self.encode
        if self.chat:  # Wu et al. wrap the book in <book></book> for chat models
            marker = "\x00BOOK\x00"
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": f"<book>{marker}</book>{QUESTION_TEMPLATE}"}],
                tokenize=False, add_generation_prompt=True)
            head, tail = text.split(marker)
            self.head, self.tail = enc(head), self.after(tail)  # tail: with {question} still in it
            self.tail_text = tail
        else:
            self.head, self.tail_text = [bos_id(tokenizer)], QUESTION_TEMPLATE
        sentence_ends = [i for tok, i in tokenizer.get_vocab().items()
                         if tok.rstrip().endswith((".", "!", "?")) and len(tok.strip()) <= 3]
        self.sentence_ends = set(sentence_ends)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def after(self, text: str) -> list[int]:
        """Ids of text that follows other text (a dummy-prefix tokenizer adds no stray '▁')."""
        return encode_after(self.tokenizer, text)

    def build(self, needle: Needle, length: int, depth: float, haystack: list[int]) -> NeedleTest:
        """A prompt of `length` tokens with the needle at `depth` percent of the haystack."""
        # the answer carries its own leading space: a prefix ending in one would make "is  a" (a lone
        # space token before the answer)
        prefix, answer, suffix = self.after(needle.prefix.rstrip()), self.after(" " + needle.answer.strip()), \
            self.after(needle.suffix)
        tail = self.after(self.tail_text.format(question=needle.question))
        n_hay = length - len(self.head) - len(prefix) - len(answer) - len(suffix) - len(tail)
        if n_hay < 16:
            raise ValueError(f"length {length} leaves no room for a haystack")
        context = haystack[:n_hay]
        point = round(n_hay * depth / 100)
        if 0 < point < n_hay:  # back up to the last sentence end, like Wu et al.
            while point > 0 and context[point - 1] not in self.sentence_ends:
                point -= 1
        start = len(self.head) + point + len(prefix)
        ids = [*self.head, *context[:point], *prefix, *answer, *suffix, *context[point:], *tail]
        return NeedleTest(needle, length, depth, ids, (start, start + len(answer)))


def build_tests(tokenizer: Any, texts: tuple[str, ...], lengths: list[int], depths: list[float],
                needles: tuple[Needle, ...] = NEEDLES, chat: bool = False) -> list[NeedleTest]:
    """The grid lengths x depths x needles; needle i reads its own stretch of the corpus."""
    builder = PromptBuilder(tokenizer, chat)
    stream = haystack_ids(texts, tokenizer, max(lengths) * (len(needles) + 1))
    stride = len(stream) // (len(needles) + 1)
    tests = []
    for i, needle in enumerate(needles):
        hay = (stream[i * stride:] + stream)[:max(lengths)]  # a different haystack per needle
        for length in lengths:
            for depth in depths:
                tests.append(builder.build(needle, length, depth, hay))
    return tests
