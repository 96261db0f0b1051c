"""Concepts: named word lists with prompts, tokenized per model (Head Pursuit, arXiv 2510.21518).

A concept is a list of words plus two prompt sets: `prompts` (samples whose pooled head outputs
SOMP explains) and `heldout` (prompts for the editing check, never used for ranking). Built-in
concepts live in `workers/data/concepts/builtin.toml`; user concepts come from a file or the
command line (see `parse_concept_spec`).

Tokenization, per model: every word is tried as `w`, `W` (capitalized), `w.lower()`, each with and
without a leading space. A variant that is one token contributes that token id. A word none of
whose variants is a single token is *multi-token*: it is flagged, kept out of the SOMP dictionary
and out of the probability mass (the paper's choice for Gemma 3: multi-token words made SOMP pick
heads that write single letters), and still counted when it appears in generated text.

API other families use:
    load_concepts(names) -> list[Concept]
    concept_token_ids(concept, tokenizer) -> list[int]
    tokenize_concept(concept, tokenizer) -> ConceptTokens   (ids plus the flagged words)
    concept_mass(logits, ids) -> probability mass per row
    count_concept_words(text, concept) -> occurrences in a text
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atlas.errors import BadInput, NotFound
from workers.user_files import allowed_roots, confine, read_text

BUILTIN_FILE = Path(__file__).parent / "data" / "concepts" / "builtin.toml"
BUILTIN = "builtin"

# Prompts for user concepts given only as words ({name} is the concept's name, e.g. "planets").
GENERIC_PROMPTS = ("Here is a list of {name}:", "Name three {name}:", "My favourite of all the {name} is",
                   "Let me tell you about {name}.", "The most famous of the {name} is",
                   "Question: Can you name one of the {name}? Answer:")
GENERIC_HELDOUT = ("Some well-known {name} are", "One example of {name} is", "Among all {name}, I like",
                   "A list of {name}:")


@dataclass(frozen=True)
class Concept:
    name: str
    words: tuple[str, ...]
    prompts: tuple[str, ...]
    heldout: tuple[str, ...]
    source: str = BUILTIN  # "builtin", a file path, or "inline"

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Concept:
        return cls(data["name"], tuple(data["words"]), tuple(data["prompts"]), tuple(data["heldout"]),
                   data.get("source", BUILTIN))


def _from_table(name: str, table: dict[str, Any], source: str) -> Concept:
    words = [str(w).strip() for w in table.get("words", []) if str(w).strip()]
    if not words:
        raise BadInput(f"concept '{name}' ({source}) has no words", "give it a non-empty `words` list")
    prompts = [str(p) for p in table.get("prompts", [])] or [p.format(name=_spoken(name)) for p in GENERIC_PROMPTS]
    heldout = [str(p) for p in table.get("heldout", [])] or [p.format(name=_spoken(name)) for p in GENERIC_HELDOUT]
    overlap = set(prompts) & set(heldout)
    if overlap:
        raise BadInput(f"concept '{name}' uses {sorted(overlap)[0]!r} both to rank and to verify",
                       "held-out prompts must not appear among the training prompts")
    return Concept(name, tuple(dict.fromkeys(words)), tuple(prompts), tuple(heldout), source)


def _spoken(name: str) -> str:
    return name.replace("_", " ")


def builtin_concepts() -> dict[str, Concept]:
    data = tomllib.loads(BUILTIN_FILE.read_text())
    return {name: _from_table(name, table, BUILTIN) for name, table in data.items()}


def builtin_names() -> list[str]:
    return list(builtin_concepts())


_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


def parse_concept_spec(spec: str) -> list[Concept]:
    """One `--concepts` item -> concepts.

    - `colors`                     a built-in concept
    - `path/to/planets.txt`        one word per line (`#` comments); name = file stem
    - `planets=path/to/file.txt`   the same with an explicit name
    - `path/to/mine.toml`          tables like the built-in file (words, prompts, heldout), many at once
    - `planets=mercury/venus/mars` inline words separated by `/`
    Concepts without prompts get generic ones built from the name (see GENERIC_PROMPTS).
    """
    spec = spec.strip()
    builtin = builtin_concepts()
    if spec in builtin:
        return [builtin[spec]]
    name, _, value = spec.partition("=") if "=" in spec else ("", "", spec)
    if name and not _NAME.match(name):
        raise BadInput(f"'{name}' is not a usable concept name", "use letters, digits, _ and -")
    path = _concept_path(value)
    if path is not None:
        if path.suffix == ".toml":
            try:
                tables = tomllib.loads(read_text(path, "concept file"))
            except tomllib.TOMLDecodeError as exc:
                raise BadInput(f"{path} is not valid TOML: {exc}", "see workers/data/concepts/builtin.toml") from exc
            if name:  # top-level words, the table called NAME, or the file's only table, renamed
                subtables = [t for t in tables.values() if isinstance(t, dict)]
                table = (tables if "words" in tables else tables.get(name)
                         or (subtables[0] if len(subtables) == 1 else {}))
                return [_from_table(name, table, str(path))]
            return [_from_table(n, t, str(path)) for n, t in tables.items() if isinstance(t, dict)]
        words = [line.split("#", 1)[0].strip() for line in read_text(path, "concept file").splitlines()]
        return [_from_table(name or path.stem, {"words": words}, str(path))]
    if name:
        return [_from_table(name, {"words": value.split("/")}, "inline")]
    raise NotFound(f"unknown concept '{spec}'",
                   f"built-in concepts: {', '.join(builtin)}; or NAME=w1/w2/w3, or a .txt/.toml file")


def _concept_path(value: str) -> Path | None:
    """The file a spec names, or None for inline words. Under `atlas serve` a file must lie under
    the operator's data directories (a `.txt`/`.toml` name elsewhere is refused, not tried inline)."""
    if allowed_roots() is None:
        path = Path(value).expanduser()
        if path.suffix in (".txt", ".toml") or path.exists():
            if not path.exists():
                raise NotFound(f"no concept file at {value}", "pass a .txt (one word per line) or a .toml file")
            return path
        return None
    if Path(value).suffix in (".txt", ".toml") or value.startswith(("/", "~", ".")) or ".." in Path(value).parts:
        return confine(value)  # clearly a path: under the data directories, or refused
    try:
        return confine(value)
    except BadInput:
        return None  # not a file under the data directories: inline words


def load_concepts(names: str | Iterable[str] | None = None) -> list[Concept]:
    """Concepts by name or spec; None or 'all' gives every built-in concept. Names must be unique."""
    if names is None or names == "all":
        return list(builtin_concepts().values())
    specs = [s for s in (names.split(",") if isinstance(names, str) else names) if s.strip()]
    if not specs:
        raise BadInput("no concepts given", f"built-in concepts: {', '.join(builtin_names())}")
    out: list[Concept] = []
    for spec in specs:
        out.extend(parse_concept_spec(spec))
    seen = [c.name for c in out]
    dupes = sorted({n for n in seen if seen.count(n) > 1})
    if dupes:
        raise BadInput(f"concept name(s) given twice: {', '.join(dupes)}", "give each concept once")
    return out


# -- per-model tokenization ---------------------------------------------------------------------
@dataclass
class ConceptTokens:
    """A concept tokenized for one model."""

    concept: str
    ids: list[int]  # unique single-token ids over all variants, sorted
    texts: list[str]  # the token strings of `ids`
    word_ids: dict[str, list[int]] = field(default_factory=dict)  # word -> its single-token ids
    multi_token: list[str] = field(default_factory=list)  # words with no single-token variant

    def summary(self) -> dict[str, Any]:
        return {"n_words": len(self.word_ids) + len(self.multi_token), "n_tokens": len(self.ids),
                "multi_token_words": self.multi_token}


def variants(word: str) -> list[str]:
    """Surface forms tried per word: as given, capitalized, lowercase; with and without a leading space."""
    forms = dict.fromkeys([word, word[:1].upper() + word[1:], word.lower()])
    return [prefix + form for form in forms for prefix in ("", " ")]


def tokenize_concept(concept: Concept, tokenizer: Any, n_vocab: int | None = None) -> ConceptTokens:
    word_ids: dict[str, list[int]] = {}
    multi: list[str] = []
    special = set(tokenizer.all_special_ids)  # an unknown form encodes to <unk>: not the word
    for word in concept.words:
        ids = []
        for form in variants(word):
            enc = tokenizer.encode(form, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in special and (n_vocab is None or enc[0] < n_vocab):
                ids.append(int(enc[0]))
        if ids:
            word_ids[word] = sorted(set(ids))
        else:
            multi.append(word)
    all_ids = sorted({i for ids in word_ids.values() for i in ids})
    texts = [tokenizer.convert_ids_to_tokens(i) for i in all_ids]
    return ConceptTokens(concept.name, all_ids, [str(t) for t in texts], word_ids, multi)


def concept_token_ids(concept: Concept, tokenizer: Any, n_vocab: int | None = None) -> list[int]:
    """The concept's single-token ids for this tokenizer (all variants), sorted and unique."""
    return tokenize_concept(concept, tokenizer, n_vocab).ids


def concept_mass(logits: Any, ids: Sequence[int] | Any) -> Any:
    """Probability the next token is one of `ids`: logits (..., vocab) -> (...), in [0, 1].

    Softmax in float32 over the full vocabulary, then the sum over the concept's ids.
    """
    import torch

    index = ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)
    probs = torch.softmax(logits.float(), dim=-1)
    return probs.index_select(-1, index.to(probs.device)).sum(-1)


def word_pattern(concept: Concept) -> re.Pattern[str]:
    words = sorted(concept.words, key=len, reverse=True)
    return re.compile(r"(?<![\w])(" + "|".join(re.escape(w) for w in words) + r")(?![\w])", re.IGNORECASE)


def count_concept_words(text: str, concept: Concept) -> int:
    """Whole-word, case-insensitive occurrences of the concept's words (multi-token words included)."""
    return len(word_pattern(concept).findall(text))


# -- control dictionaries ----------------------------------------------------------------------
CONTROL_WINDOW = 32  # a control id is drawn from this many same-kind word tokens nearest in id rank
_WORD = re.compile(r"^[A-Za-z]+$")
_SPACE_MARKS = ("\u0120", "\u2581", " ")  # byte-level BPE's 'Ġ', SentencePiece's '▁', a plain space


def token_kind(token: str) -> tuple[bool, bool] | None:
    """(leading space, capitalized) for a word-like token string (ASCII letters, optionally after a
    space mark), else None: the shape a control token must share with the concept token it stands for."""
    spaced = token.startswith(_SPACE_MARKS)
    word = token[1:] if spaced else token
    if not _WORD.match(word):
        return None
    return spaced, word[0].isupper()


@dataclass
class ControlDraw:
    """Control dictionaries for one concept, with how they were drawn (for the run config)."""

    ids: list[list[int]]
    matched: int  # concept ids whose control came from same-kind word tokens near in id rank
    fallback: int  # concept ids with no such token left: drawn from the whole non-special vocabulary


class ControlPools:
    """A tokenizer's word tokens grouped by kind (`token_kind`), in id order: built once per run."""

    def __init__(self, tokenizer: Any, n_vocab: int) -> None:
        upper = min(n_vocab, len(tokenizer))
        self.special = set(tokenizer.all_special_ids)
        self.n_vocab = n_vocab
        self.kinds = [token_kind(str(tok)) for tok in tokenizer.convert_ids_to_tokens(list(range(upper)))]
        self.pools: dict[tuple[bool, bool], list[int]] = {}
        for i, kind in enumerate(self.kinds):
            if kind is not None and i not in self.special:
                self.pools.setdefault(kind, []).append(i)

    def kind(self, token_id: int) -> tuple[bool, bool] | None:
        return self.kinds[token_id] if token_id < len(self.kinds) else None


def control_token_ids(pools: ControlPools, concept_ids: list[int], n: int, seed: str,
                      window: int = CONTROL_WINDOW) -> ControlDraw:
    """n random dictionaries of len(concept_ids) ids each, disjoint from the concept's ids.

    Each concept id is stood for by a word token of the same kind (`token_kind`: leading space,
    capitalization) drawn among the `window` such tokens nearest to it in id order, a frequency proxy
    (BPE vocabularies are built in merge order, so lower ids are the more frequent strings). Without
    this, controls drawn from the whole vocabulary were mostly byte, sub-word, special and unused ids,
    whose unembedding rows a head's output does not resemble, which made every control easy to beat.
    Tokenizers without enough word tokens of a kind (tiny word-level test vocabularies) fall back to
    the whole non-special vocabulary for those ids; both counts are returned."""
    import torch

    gen = torch_generator(seed)
    concept = set(concept_ids)
    draws: list[list[int]] = []
    matched = fallback = 0
    for d in range(n):
        taken = set(concept)
        draw: list[int] = []
        for cid in concept_ids:
            kind = pools.kind(cid)
            pool = pools.pools.get(kind, []) if kind is not None else []
            at = bisect.bisect_left(pool, cid)
            near = [i for _, i in sorted((abs(i - cid), i) for i in pool[max(0, at - 2 * window):at + 2 * window]
                                         if i not in taken)][:window]
            if near:
                pick = near[int(torch.randint(len(near), (), generator=gen))]
                matched += d == 0
            else:
                free = [i for i in range(pools.n_vocab) if i not in taken and i not in pools.special]
                pick = free[int(torch.randint(len(free), (), generator=gen))]
                fallback += d == 0
            taken.add(pick)
            draw.append(pick)
        draws.append(draw)
    return ControlDraw(draws, matched, fallback)


def torch_generator(seed: str) -> Any:
    """A torch.Generator seeded from a string (stable across processes)."""
    import torch

    return torch.Generator().manual_seed(int(hashlib.sha256(seed.encode()).hexdigest()[:15], 16))
