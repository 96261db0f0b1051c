"""Corpora: user files (text, JSONL, Parquet, a HF dataset when reachable) and the embedded default.

The embedded default needs no network: English prose paragraphs from the docstrings of the
Python standard library's own source files, read with `ast` (nothing is imported), in a fixed
order. Its provenance (Python version, files, filter) is recorded; its id is a content hash,
like every corpus's.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas.errors import BadInput, NotFound
from workers.user_files import allowed_roots, confine, read_bytes

EMBEDDED = "embedded"


@dataclass(frozen=True)
class Corpus:
    name: str
    texts: tuple[str, ...]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def corpus_id(self) -> str:
        digest = hashlib.sha256("\x00".join(self.texts).encode()).hexdigest()[:16]
        return f"{self.name}:{digest}"


_PROSE = re.compile(r"^[A-Z][^\n]*[.!?]$", re.S)


def _prose_paragraphs(doc: str) -> list[str]:
    keep = []
    for para in re.split(r"\n\s*\n", doc):
        lines = [line.strip() for line in para.strip().splitlines()]
        text = " ".join(lines)
        words = text.split()
        if len(words) < 25 or any(line.startswith((">>>", "...", ":", "-", "*", "|")) for line in lines):
            continue
        letters = sum(ch.isalpha() or ch.isspace() for ch in text) / len(text)
        if letters > 0.93 and _PROSE.match(text) and "::" not in text and "`" not in text:
            keep.append(text)
    return keep


@functools.lru_cache(maxsize=4)  # every family's config() asks for it at plan time; parse the stdlib once
def embedded_corpus(max_chars: int = 400_000) -> Corpus:
    """Prose from stdlib docstrings, deterministic for a given Python version."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    files: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree)
                         if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
        found = [p for node in nodes for p in _prose_paragraphs(ast.get_docstring(node) or "")]
        if found:
            files.append(path.name)
            texts.extend(found)
            total += sum(len(p) for p in found)
        if total >= max_chars:
            break
    provenance = {"source": "docstrings of the Python standard library (read with ast)",
                  "python": sys.version.split()[0], "files": len(files), "paragraphs": len(texts),
                  "filter": "prose paragraphs: >= 25 words, mostly letters, no code or markup"}
    return Corpus(EMBEDDED, tuple(texts), provenance)


HF_PREFIX = "hf:"  # an explicit dataset name, never a path (the server passes names this way)


def load_corpus(spec: str | None, text_field: str = "text") -> Corpus:
    """A corpus from a path (.txt, .jsonl, .parquet), a HF dataset name, or the embedded default.

    Files are read bounded and regular-only (workers/user_files.py); under `atlas serve` only from
    the directories its operator allowed."""
    if spec in (None, "", EMBEDDED):
        return embedded_corpus()
    if spec.startswith(HF_PREFIX):
        return _hf_dataset(spec.removeprefix(HF_PREFIX), text_field)
    roots = allowed_roots()
    path = Path(spec).expanduser() if roots is None else Path(spec)
    if roots is None and not path.exists():
        if "/" in spec and not spec.startswith((".", "/", "~")):
            return _hf_dataset(spec, text_field)
        raise NotFound(f"no corpus file at {spec}", "pass a .txt, .jsonl or .parquet file, or omit --corpus")
    if roots is not None:
        path = confine(spec)
    raw = read_bytes(path, "corpus")
    if not raw.strip():
        raise BadInput(f"the corpus {path} is empty", "pass a file with text in it")
    provenance = {"source": str(path.resolve()), "bytes": len(raw)}
    if path.suffix == ".parquet":
        return Corpus(path.stem, tuple(_parquet_texts(raw, path, text_field)), provenance)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"the corpus {path} is not UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 4]!r})",
                       "re-encode it as UTF-8 (e.g. iconv -t utf-8)") from exc
    if path.suffix in (".jsonl", ".ndjson"):
        texts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"{path} line {number} is not JSON: {exc}", "one JSON object per line") from exc
            if not isinstance(record, dict) or text_field not in record:
                raise BadInput(f"{path} line {number} has no '{text_field}' field",
                               "pass --text-field with the field that holds the text")
            texts.append(str(record[text_field]))
        return Corpus(path.stem, tuple(texts), {**provenance, "field": text_field})
    return Corpus(path.stem, tuple(p for p in re.split(r"\n\s*\n", text) if p.strip()), provenance)


def _parquet_texts(raw: bytes, path: Path, column: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(raw))
    except Exception as exc:
        raise BadInput(f"{path} is not a readable Parquet file: {exc}", "check the file") from exc
    if column not in table.column_names:
        raise BadInput(f"{path} has no column '{column}' (columns: {', '.join(table.column_names)})",
                       "pass --text-field with the column that holds the text")
    return [str(t) for t in table.column(column).to_pylist() if t]


def _hf_dataset(name: str, text_field: str) -> Corpus:
    try:
        import datasets
    except ImportError as exc:
        raise NotFound(f"'{name}' is not a file, and the `datasets` package is not installed",
                       "pip install datasets, or pass a local file") from exc
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:
        raise NotFound(f"could not load the dataset '{name}': {exc}", "check the name and the network") from exc
    if text_field not in ds.column_names:
        raise BadInput(f"dataset {name} has no column '{text_field}'", "pass --text-field")
    return Corpus(name.replace("/", "__"), tuple(ds[text_field]), {"source": f"hf:{name}", "field": text_field})


# how token_windows cuts a corpus, for the run config's definitions of the families that read windows
WINDOWS_DEFINITION = "prepend tokenizer BOS (else EOS); windows cut from texts joined by EOS"


def token_windows(corpus: Corpus, tokenizer: Any, window: int, max_windows: int | None = None,
                  bos: int | None = None) -> Any:
    """Cut the corpus into fixed-length token windows, (n, window) long tensor; BOS first if given.

    Texts are joined with the tokenizer's EOS (or a newline) and cut without padding, so every
    position is a real token.
    """
    import torch

    body = window - (1 if bos is not None else 0)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else tokenizer.encode("\n")
    ids: list[int] = []
    needed = None if max_windows is None else max_windows * body
    for text in corpus.texts:
        ids += tokenizer.encode(text, add_special_tokens=False) + sep
        if needed is not None and len(ids) >= needed:
            break
    n = len(ids) // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise BadInput(f"the corpus {corpus.name} has {len(ids)} tokens, too short for one window of {window}",
                       "pass a longer corpus or a smaller window")
    chunks = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        chunks = torch.cat([torch.full((n, 1), bos, dtype=torch.long), chunks], dim=1)
    return chunks
