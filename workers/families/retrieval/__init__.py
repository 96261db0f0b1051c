"""Retrieval heads (Wu et al., arXiv 2404.15574): copy-paste from a needle during greedy decoding.

Per test (one needle at one length and depth), the prompt is prefilled with sdpa and decoded
greedily; at every decode step t the probe (workers/families/retrieval/decode_probe.py) gives each head's argmax key
j*_t from that step's query and the cached keys, never a T x T matrix. Head h hits at step t when
b <= j*_t < e (the answer span) and prompt[j*_t] equals the generated token w_t. Per test,
s_h = hits / (e - b), repeated hits counted again as in Wu et al.'s code. A test is kept only if
the answer is right (ROUGE-1 recall of the answer in the response > 0.5); others are dropped.

Stored per head:
- `retrieval.score`: mean s_h over kept tests; range [0, ~1] (above 1 only if a head copies the
  answer more than once), higher = more copy-paste retrieval. Wu et al. label > 0.1 a retrieval
  head and find 3-6% of heads above it in 7B models. Failure cases: a model that never answers
  keeps no tests (score 0, n 0); short answers give coarse scores; heads that copy through a
  spread-out pattern (argmax elsewhere) score 0.
- `retrieval.activation_frequency`: share of kept tests with s_h > 0, in [0, 1].
- `retrieval.tests_kept`: number of kept tests (same for every head; n on every row).

Masking check (run_metrics `retrieval.mask.*`, edits rows): the needle score (mean ROUGE-1 recall
over a test subset) with the top-k heads' queries zeroed on decode steps only, against k random
heads drawn from the same layers, as in Wu et al.'s `needle_in_haystack_with_mask.py`.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any, ClassVar

import numpy as np
import torch

from workers.batching import decode_rows
from workers.corpora import load_corpus
from workers.families.base import FamilyResult, head_metric_rows, scaled_batch
from workers.families.retrieval.decode_probe import DecodeProbe, attached
from workers.families.retrieval.needles import (
    NEEDLES,
    NeedleTest,
    build_tests,
    depth_grid,
    length_grid,
    rouge1_recall,
    stop_ids,
)
from workers.kv_cache import new_cache, stacked, with_cache
from workers.models import LoadedModel
from workers.options import CORPUS, SEED, TEXT_FIELD, Option, resolve


def copy_hits(pos: torch.Tensor, prompt: torch.Tensor, span: tuple[int, int], token: int) -> torch.Tensor:
    """Wu et al.'s copy-paste test for one step: argmax in [b, e) and prompt[argmax] == token.

    pos: argmax positions, any shape (e.g. (n_layers, n_heads)); prompt: (T,) ids. Same shape, bool.
    """
    inside = (pos >= span[0]) & (pos < span[1])
    return inside & (prompt[pos.clamp(0, len(prompt) - 1)] == token)


def prefill(lm: LoadedModel, ids: list[int]) -> Any:
    """Run prompt[:-1] through the model (sdpa path); returns the KV cache. Memory O(T)."""
    cache = new_cache(lm.model)  # no (T, vocab) logits below: the prompt's last token is fed again
    lm.model(torch.tensor([ids[:-1]], device=lm.device), logits_to_keep=1, **with_cache(lm.model, cache))
    return cache


def decode(lm: LoadedModel, test: NeedleTest, cache: Any, probe: DecodeProbe, max_new: int,
           stops: list[int]) -> tuple[list[int], np.ndarray]:
    """Greedy decode from a prefilled cache; returns (generated ids, hits (n_layers, n_heads)).

    Feeds the last prompt token first, as Wu et al. do, so every step is a q_len = 1 step.
    """
    return decode_tests(lm, [test], cache, probe, max_new, stops)[0]


def decode_tests(lm: LoadedModel, tests: list[NeedleTest], cache: Any, probe: DecodeProbe, max_new: int,
                 stops: list[int]) -> list[tuple[list[int], np.ndarray]]:
    """`decode` for several prompts of one length side by side, one batch row each (cache: one row per
    test, in order); every row gets what its own decode gives: its tokens, and its hits up to and
    including the step that produced its stop token. One step costs about what a one-row step costs."""
    a = lm.adapter
    length = len(tests[0].ids)
    prompts = [torch.tensor(t.ids) for t in tests]
    hits = [torch.zeros(a.n_layers, a.n_heads, dtype=torch.long) for _ in tests]
    generated: list[list[int]] = [[] for _ in tests]
    done = [False] * len(tests)
    current = torch.tensor([[t.ids[-1]] for t in tests], device=lm.device)
    for step in range(max_new):
        tokens = lm.model(current, **with_cache(lm.model, cache)).logits[:, -1].argmax(-1).tolist()
        pos = probe.absolute(a.n_layers, length + step).cpu() if probe.record else None  # (L, rows, H)
        for row, token in enumerate(tokens):
            if done[row]:
                continue
            if pos is not None:
                hits[row] += copy_hits(pos[:, row], prompts[row], tests[row].span, token)
            if token in stops:
                done[row] = True
            else:
                generated[row].append(token)
        if all(done):
            break
        current = torch.tensor(tokens, device=lm.device)[:, None]
    return [(g, h.numpy()) for g, h in zip(generated, hits, strict=True)]


def stacked_prefills(lm: LoadedModel, tests: list[NeedleTest], prefix: PrefixCache, headroom: int,
                     copies: int = 1) -> Any:
    """One cache holding every test's prompt (ids[:-1]) as its own batch row, `copies` rows each (test 0
    x copies, test 1 x copies, ...), with room for `headroom` decoded tokens; each prompt prefilled
    through `prefix` (sharing the previous one's haystack) and copied into its rows."""
    rows = (kv for test in tests for kv in itertools.repeat(prefix.prefill(test.ids), copies))
    return stacked(lm.model, rows, len(tests) * copies, headroom)


def batches(tests: list[NeedleTest], order: list[int], size: int) -> list[list[int]]:
    """Test indices in `order`, cut into batches of prompts of one token length, at most `size` each."""
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < size and len(tests[out[-1][0]].ids) == len(tests[i].ids):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def needle_scores(lm: LoadedModel, tests: list[NeedleTest], masks: dict[str, list[tuple[int, int]]],
                  max_new: int) -> dict[str, list[float]]:
    """ROUGE-1 recall per test under each head mask ({name: heads}): one prefill per test, then every
    mask decodes side by side, one batch row each (per-row query masks), several tests at a time."""
    stops = stop_ids(lm.tokenizer)
    names = list(masks)
    a = lm.adapter
    pattern: dict[int, torch.Tensor] = {}  # {layer: (masks, heads)}
    for row, name in enumerate(names):
        for layer, head in masks[name]:
            pattern.setdefault(layer, torch.zeros(len(names), a.n_heads, dtype=torch.bool))[row, head] = True
    out: dict[str, list[float]] = {name: [0.0] * len(tests) for name in masks}
    prefix = PrefixCache(lm)
    size = max(1, decode_batch(lm, max(len(t.ids) for t in tests)) // len(names)) if prefix.enabled else 1
    probe = DecodeProbe(record=False)
    with torch.inference_mode(), attached(lm.model, probe):
        for batch in batches(tests, _haystack_order(tests), size):
            group = [tests[i] for i in batch]
            if size > 1:  # rows: test 0 x every mask, test 1 x every mask, ...
                cache = stacked_prefills(lm, group, prefix, max_new, copies=len(names))
            else:
                cache = prefix.prefill(group[0].ids)
                cache.batch_repeat_interleave(len(names))
            probe.row_mask = {layer: rows.repeat(len(group), 1) for layer, rows in pattern.items()}
            rows = [test for test in group for _ in names]
            decoded = decode_tests(lm, rows, cache, probe, max_new, stops)
            for j, i in enumerate(batch):
                for k, name in enumerate(names):
                    generated = decoded[j * len(names) + k][0]
                    out[name][i] = rouge1_recall(tests[i].needle.answer, lm.tokenizer.decode(generated))
            if size == 1:
                cache.batch_select_indices(torch.tensor([0]))  # back to one row: the next prompt's prefix
    return out


def _haystack_order(tests: list[NeedleTest]) -> list[int]:
    """Test indices grouped by haystack, deepest needle first: each prompt shares the previous one's
    tokens up to its own needle, so PrefixCache prefills only the rest."""
    return sorted(range(len(tests)), key=lambda i: (tests[i].needle.name, tests[i].length, -tests[i].depth))


DECODE_BATCH = 32  # rows decoded side by side at most: a decode step reads every weight once, for 1 row or 32


def decode_batch(lm: LoadedModel, length: int, config: dict[str, Any] | None = None) -> int:
    """How many prompts of `length` tokens decode side by side: DECODE_BATCH, fewer where their KV cache rows
    (in the model's dtype) would not fit the free device memory (workers/batching.py); halved on a retry."""
    rows = decode_rows(lm.model, lm.device, lm.dtype, length, DECODE_BATCH)
    return scaled_batch(config, rows) if config is not None else rows


class PrefixCache:
    """Prefills that reuse the previous prompt's cache up to their common prefix: the needle tests of
    one haystack share it up to the insertion point (deepest first). Off for sliding-window models,
    whose cache drops old keys and cannot be cut back."""

    def __init__(self, lm: LoadedModel) -> None:
        config = lm.model.config
        sliding = getattr(config, "sliding_window", None) or "sliding_attention" in (getattr(config, "layer_types",
                                                                                             None) or ())
        self.lm, self.enabled = lm, not sliding
        self.ids: list[int] = []
        self.cache: Any = None
        self.reused = 0  # prompt tokens not prefilled again, over all calls

    def prefill(self, ids: list[int]) -> Any:
        """A cache holding ids[:-1], like prefill(); valid until the next call (decoding extends it)."""
        shared = 0
        if self.enabled and self.cache is not None:
            limit = min(len(self.ids), len(ids)) - 1
            while shared < limit and self.ids[shared] == ids[shared]:
                shared += 1
        if shared < 64:  # not worth it; start over
            self.cache, shared = prefill(self.lm, ids), len(ids) - 1
        else:
            self.cache.crop(shared - self.cache.get_seq_length())  # drop the old suffix and what was decoded
            if shared < len(ids) - 1:
                rest = torch.tensor([ids[shared:-1]], dtype=torch.long, device=self.lm.device)
                self.lm.model(rest, logits_to_keep=1, **with_cache(self.lm.model, self.cache))
            self.reused += shared
        self.ids = list(ids)
        return self.cache


def random_same_layers(top: list[tuple[int, int]], n_heads: int, seed: int) -> list[tuple[int, int]]:
    """One random head per top head, from the same layer, outside the top set where possible."""
    rng = random.Random(seed)
    chosen: set[tuple[int, int]] = set()
    for layer, _ in top:
        pool = [(layer, h) for h in range(n_heads) if (layer, h) not in top and (layer, h) not in chosen]
        pool = pool or [(layer, h) for h in range(n_heads) if (layer, h) not in chosen]
        chosen.add(rng.choice(pool))
    return sorted(chosen)


class RetrievalFamily:
    name = "retrieval"
    version = 3  # 2: the needle sentence has no double space before the answer (issue 14 item 7)
    # 3: dummy-prefix tokenizers: pieces encoded mid-sentence, <0x0A> stops the answer (issue 14 item 6)
    stores = ("head_metrics", "edits", "run_metrics")

    options = (
        Option("max_context", "int", 1024, "longest haystack in tokens (lengths double up to it)",
               min=256, max=1 << 20),
        Option("retrieval_lengths", "int", 0, "haystack lengths; 0 doubles from retrieval_min_length", min=0, max=64),
        Option("retrieval_min_length", "int", 1024, "shortest haystack in tokens", min=64, max=1 << 20),
        Option("retrieval_depths", "int", 10, "needle depths per length", min=1, max=100),
        Option("retrieval_max_new_tokens", "int", 40, "tokens decoded per needle test", min=1, max=1024),
        Option("retrieval_prompt", "str", "chat", "prompt format: the chat template, or plain text",
               choices=("chat", "plain")),
        Option("retrieval_mask_k", "int", 10, "top retrieval heads masked in the masking check; 0 skips it", min=0,
               max=100_000),
        Option("retrieval_mask_seeds", "int", 2, "random head sets in the masking check", min=0, max=100),
        Option("retrieval_mask_tests", "int", 6, "needle tests in the masking check; 0 skips it", min=0,
               max=100_000),
        SEED, CORPUS, TEXT_FIELD,
    )

    # how the metrics are defined: stored with every run (runs.config.definitions), not hashed into its id
    definitions: ClassVar[dict[str, str]] = {
        "keep_if": "rouge1_recall(answer, response) > 0.5 (lowercase alnum unigrams, no stemming)",
        "hit": "argmax in answer span and prompt[argmax] == generated token",
        "mask_tests": "kept tests at the longest length, evenly spread, at most mask_max_tests",
        "mask_mode": "query zeroed on decode steps only (uniform attention)",
        "attn_implementation": "sdpa prefill; decode-step argmax probe (q.K^T, GQA)",
    }

    def config(self, options: dict[str, Any]) -> dict[str, Any]:
        o = resolve(self.options, options)
        max_context = o["max_context"]
        corpus = load_corpus(o["corpus"], o["text_field"])
        return {"corpus": o["corpus"], "text_field": o["text_field"],
                "corpus_id": corpus.corpus_id, "max_context": max_context,
                "n_lengths": o["retrieval_lengths"],  # 0: doubling from min_length
                "min_length": o["retrieval_min_length"],
                "depths": depth_grid(o["retrieval_depths"]),
                "needles": [n.name for n in NEEDLES],
                "max_new_tokens": o["retrieval_max_new_tokens"],
                "prompt": o["retrieval_prompt"],
                "mask_k": o["retrieval_mask_k"],
                "mask_random_seeds": o["retrieval_mask_seeds"],
                "mask_max_tests": o["retrieval_mask_tests"],
                "seed": o["seed"]}

    def probe_set(self, config: dict[str, Any]) -> str:
        return f"needles:{len(config['needles'])}:{config['corpus_id']}:max={config['max_context']}"

    def grid(self, lm: LoadedModel, config: dict[str, Any]) -> list[int]:
        """Lengths scaled to the model's context (max_position_embeddings) and max_context."""
        model_ctx = getattr(lm.model.config, "max_position_embeddings", None) or config["max_context"]
        longest = min(config["max_context"], int(model_ctx) - config["max_new_tokens"] - 1)
        if config["n_lengths"]:
            return length_grid(longest, config["n_lengths"], min(config["min_length"], longest))
        lengths, x = [], min(config["min_length"], longest)
        while x < longest:  # 1024, 2048, 4096, ... up to the longest
            lengths.append(x)
            x *= 2
        return [*lengths, longest]

    def tests(self, lm: LoadedModel, config: dict[str, Any]) -> list[NeedleTest]:
        corpus = load_corpus(config["corpus"], config["text_field"])
        chosen = tuple(n for n in NEEDLES if n.name in config["needles"])
        return build_tests(lm.tokenizer, corpus.texts, self.grid(lm, config), config["depths"],
                           chosen, chat=config["prompt"] == "chat")

    def run(self, lm: LoadedModel, config: dict[str, Any]) -> FamilyResult:
        a = lm.adapter
        tests = self.tests(lm, config)
        stops = stop_ids(lm.tokenizer)
        recalls, scores = [0.0] * len(tests), [np.zeros(0)] * len(tests)
        prefix = PrefixCache(lm)
        longest = max(len(t.ids) for t in tests)
        size = decode_batch(lm, longest, config) if prefix.enabled else 1  # full attention only
        with torch.inference_mode(), attached(lm.model, DecodeProbe(record=True)) as probe:
            for batch in batches(tests, _haystack_order(tests), size):
                group = [tests[i] for i in batch]
                cache = (stacked_prefills(lm, group, prefix, config["max_new_tokens"]) if size > 1
                         else prefix.prefill(group[0].ids))
                decoded = decode_tests(lm, group, cache, probe, config["max_new_tokens"], stops)
                for i, test, (generated, hits) in zip(batch, group, decoded, strict=True):
                    recalls[i] = rouge1_recall(test.needle.answer, lm.tokenizer.decode(generated))
                    scores[i] = hits / (test.span[1] - test.span[0])  # (n_layers, n_heads)
        kept = np.array(recalls) > 0.5
        per_test = np.stack(scores)[kept]  # (kept, n_layers, n_heads)
        n = int(kept.sum())
        zeros = np.zeros((a.n_layers, a.n_heads))
        score = per_test.mean(0) if n else zeros
        freq = (per_test > 0).mean(0) if n else zeros
        stderr = per_test.std(0) / np.sqrt(n) if n > 1 else None
        rows = head_metric_rows("retrieval.score", score, stderr, n)
        rows += head_metric_rows("retrieval.activation_frequency", freq, None, n)
        rows += head_metric_rows("retrieval.tests_kept", zeros + n, None, n)
        grid = {"lengths": sorted({t.length for t in tests}), "depths": config["depths"],
                "needles": config["needles"], "tests": len(tests), "kept": n}
        per_length = {str(length): float(np.mean([r for r, t in zip(recalls, tests, strict=True)
                                                  if t.length == length])) for length in grid["lengths"]}
        run_metrics = [
            {"metric": "retrieval.tests_kept", "value": float(n), "detail": grid},
            {"metric": "retrieval.needle_score", "value": float(np.mean(recalls)),
             "detail": {"per_length": per_length,
                        "tests": [{"needle": t.needle.name, "length": t.length, "depth": t.depth,
                                   "recall": round(r, 4)} for t, r in zip(tests, recalls, strict=True)]}},
            {"metric": "retrieval.share_above_0.1", "value": float((score > 0.1).mean()),
             "detail": {"histogram": distribution(score)}},
        ]
        edits, mask_metrics = self.masking(lm, config, tests, recalls, score) if n else ([], [])
        run_metrics = [{**m, "detail": json.dumps(m["detail"])} for m in run_metrics + mask_metrics]
        return FamilyResult({"head_metrics": rows, "edits": edits, "run_metrics": run_metrics},
                            tokens=sum(len(t.ids) for t in tests),
                            extra_config={"grid": grid, "stop_ids": stops, "prefix_tokens_reused": prefix.reused,
                                          "prompt_used": (
                                "chat" if config["prompt"] == "chat" and lm.tokenizer.chat_template else "plain")})

    def masking(self, lm: LoadedModel, config: dict[str, Any], tests: list[NeedleTest], recalls: list[float],
                score: np.ndarray) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Needle score with the top-k heads masked vs k random heads from the same layers.

        Run on tests the clean model solved (their clean score is known from the scoring pass), so
        a drop means the masked heads were needed; one prefill per test, masks on decode only.
        """
        k = min(config["mask_k"], int((score > 0).sum()))
        if k == 0:
            return [], []
        order = np.argsort(-score, axis=None, kind="stable")[:k]
        top = sorted((int(i) // score.shape[1], int(i) % score.shape[1]) for i in order)
        masks = {"top": top}
        for s in range(config["mask_random_seeds"]):
            masks[f"random_{s}"] = random_same_layers(top, score.shape[1], config["seed"] + s)
        longest = max(t.length for t in tests)
        pool = [i for i, t in enumerate(tests) if t.length == longest and recalls[i] > 0.5]
        pick = sorted({pool[round(j)] for j in np.linspace(0, len(pool) - 1, config["mask_max_tests"])}) \
            if pool else []
        if not pick:
            return [], []
        result = {name: float(np.mean(v)) for name, v in
                  needle_scores(lm, [tests[i] for i in pick], masks, config["max_new_tokens"]).items()}
        result["clean"] = float(np.mean([recalls[i] for i in pick]))
        edits = [{"edit_id": f"mask-{name}-k{k}", "concept": None, "k": k, "alpha": 0.0,
                  "selection": "retrieval-top" if name == "top" else f"random seed {config['seed'] + i - 1}",
                  "heads": [list(h) for h in masks[name]], "metric": "retrieval.needle_rouge1",
                  "before": result["clean"], "after": result[name]}
                 for i, name in enumerate(masks)]
        randoms = [result[name] for name in masks if name.startswith("random")]
        detail = {"k": k, "tests": len(pick), "length": longest, "clean": result["clean"], "top": result["top"],
                  "random": randoms, "top_heads": [list(h) for h in top]}
        metrics = [{"metric": "retrieval.mask.top", "value": result["top"], "detail": detail},
                   {"metric": "retrieval.mask.random", "value": float(np.mean(randoms)), "detail": detail},
                   {"metric": "retrieval.mask.clean", "value": result["clean"], "detail": detail}]
        return edits, metrics


def distribution(score: np.ndarray) -> dict[str, float]:
    """Share of heads per score bin, as in Wu et al.'s Fig. 3 (=0, (0, .1], (.1, .5], > .5)."""
    s = score.ravel()
    return {"=0": float((s == 0).mean()), "(0,0.1]": float(((s > 0) & (s <= 0.1)).mean()),
            "(0.1,0.5]": float(((s > 0.1) & (s <= 0.5)).mean()), ">0.5": float((s > 0.5).mean())}
