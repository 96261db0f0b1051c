"""Editing heads to test a concept ranking (Head Pursuit, arXiv 2510.21518, section 4).

Scale the top-k heads for a concept by alpha (-1 suppresses, 5 enhances; every position, prompt and
generated tokens alike) and measure, on the concept's held-out prompts:
- `concept_mass`: mean next-token probability of the concept's single-token ids after the prompt,
  in [0, 1]; suppression should lower it.
- `concept_words`: mean number of concept words in the greedy continuation (max_new_tokens).
- `corpus_loss`: mean next-token cross-entropy (nats) on corpus windows: the side effect.
Against: 10 random head sets with the same number of heads in each layer, disjoint from the
selection (median and IQR), and the heads with the highest logit-lens score for the concept.

Many settings share one forward: each batch row carries its own per-head scale (`row_scales`),
so a batch holds every selection x prompt at once.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from workers.batching import editing_settings, loss_settings
from workers.concepts import Concept, ConceptTokens, concept_mass, count_concept_words, load_concepts
from workers.corpora import load_corpus, token_windows
from workers.hooks import block_inputs, edit_z, resumed_at
from workers.kv_cache import keys_values, new_cache, stacked, with_cache
from workers.models import LoadedModel
from workers.probes import bos_id, encode_batch

log = logging.getLogger(__name__)
Heads = list[tuple[int, int]]


def k_values(n_total: int, fractions: Sequence[float]) -> list[int]:
    """k at each fraction of all heads, at least 1, without repeats (Gemma 3 270M: 1% = 2% = 1)."""
    return sorted({max(1, round(f * n_total)) for f in fractions})


def top_heads(scores: torch.Tensor, k: int) -> Heads:
    """The k heads with the highest score; scores (layers, heads)."""
    n_heads = scores.shape[1]
    return [(i // n_heads, i % n_heads) for i in scores.flatten().argsort(descending=True)[:k].tolist()]


def layer_matched_random(selected: Heads, n_layers: int, n_heads: int, rng: random.Random) -> Heads:
    """As many heads per layer as `selected`, drawn from heads not in it; when a layer has too few
    free heads, the rest come from the nearest layers."""
    chosen: set[tuple[int, int]] = set()
    taken = set(selected)
    for layer in sorted({lay for lay, _ in selected}):
        need = sum(1 for lay, _ in selected if lay == layer)
        for other in sorted(range(n_layers), key=lambda x: (abs(x - layer), x)):
            free = [(other, h) for h in range(n_heads) if (other, h) not in taken | chosen]
            picked = rng.sample(free, min(need, len(free)))
            chosen.update(picked)
            need -= len(picked)
            if need == 0:
                break
    return sorted(chosen)


def scale_tensor(settings: Sequence[Heads], alpha: float | Sequence[float], n_layers: int, n_heads: int,
                 repeat: int) -> torch.Tensor:
    """Per-row head scales, setting-major: (len(settings) * repeat, layers, heads). alpha: one for
    every setting, or one per setting (settings with different alphas share a forward)."""
    alphas = [alpha] * len(settings) if isinstance(alpha, int | float) else list(alpha)
    scales = torch.ones(len(settings), n_layers, n_heads)
    for i, heads in enumerate(settings):
        for layer, head in heads:
            scales[i, layer, head] = alphas[i]
    return scales.repeat_interleave(repeat, dim=0)


@contextmanager
def row_scales(lm: LoadedModel, scales: torch.Tensor) -> Iterator[None]:
    """Scale each row's heads by its own factor: scales (batch, layers, heads) on z before W_O."""
    layers = [i for i in range(scales.shape[1]) if (scales[:, i] != 1).any()]
    dev = scales.to(lm.device)

    def edit(layer: int, z: torch.Tensor) -> torch.Tensor:  # z (b, p, h, d_head)
        return z * dev[:, layer, None, :, None].to(z.dtype)

    with edit_z(lm.adapter, edit, layers):
        yield


def _left_padded(lm: LoadedModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    ids, mask = encode_batch(lm, texts, side="left")
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else bos_id(lm.tokenizer)
    return ids, mask, pad


def greedy(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, pad: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (rows, T): next-token logits after each prompt (rows, vocab) and the greedy
    continuation (rows, <= max_new_tokens), pad after a row's end-of-sequence token, like
    `generate(do_sample=False)`. The prompt runs once: its logits are the concept mass's and the
    first generated token's (generate would prefill the prompt a second time)."""
    cache = new_cache(lm.model)
    first = _prefill(lm, ids, mask, cache)
    return first, _decode(lm, cache, first, mask, max_new_tokens, pad)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp_min(0)


def _prefill(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
    """Run left-padded prompts into `cache`; the logits after each prompt, (rows, vocab) float32."""
    out = lm.model(ids, attention_mask=mask, position_ids=_positions(mask), logits_to_keep=1,
                   **with_cache(lm.model, cache))
    return out.logits[:, -1].float()


def _decode(lm: LoadedModel, cache: Any, first: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
            pad: int) -> torch.Tensor:
    """Greedy tokens from prefilled prompts, (rows, <= max_new_tokens); pad after a row's EOS."""
    eos = lm.model.generation_config.eos_token_id
    stops = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=lm.device)
    rows = len(first)
    token, last = first.argmax(-1), _positions(mask)[:, -1]
    done = torch.zeros(rows, dtype=torch.bool, device=lm.device)
    generated = []
    for step in range(max_new_tokens):
        token = torch.where(done, torch.full_like(token, pad), token)
        generated.append(token)
        done |= torch.isin(token, stops)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
        last = last + 1
        out = lm.model(token[:, None], attention_mask=mask, position_ids=last[:, None], **with_cache(lm.model, cache))
        token = out.logits[:, -1].argmax(-1)
    return torch.stack(generated, 1) if generated else mask.new_zeros(rows, 0)


class CleanPrompts:
    """The held-out prompts run once unedited: their cache, their block inputs and their logits.

    An edit whose lowest edited layer is l leaves the layers below l as they are on the prompt, so an
    edited batch starts at l from the cached residual, and its cache below l is the clean one."""

    def __init__(self, lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.ids, self.mask = ids, mask
        self.cache = new_cache(lm.model)
        with block_inputs(lm.adapter) as resid:
            self.first = _prefill(lm, ids, mask, self.cache)
        self.resid = resid

    def prefill_from(self, lm: LoadedModel, start: int, copies: int) -> tuple[Any, torch.Tensor]:
        """`copies` stacked copies of the prompts run from layer `start` (edits attached by the caller):
        their cache (the clean one below `start`) and the logits after each prompt."""
        cache = new_cache(lm.model)
        ids, mask = self.ids.repeat(copies, 1), self.mask.repeat(copies, 1)
        with resumed_at(lm.adapter, start, self.resid[start].repeat(copies, 1, 1)):
            first = _prefill(lm, ids, mask, cache)
        for layer in range(start):  # the skipped layers saw the clean prompt
            keys, values = keys_values(self.cache.layers[layer])
            cache.update(keys.repeat(copies, 1, 1, 1), values.repeat(copies, 1, 1, 1), layer)
        return cache, first


@torch.inference_mode()
def measure(lm: LoadedModel, concept: Concept, ids: list[int], settings: Sequence[Heads],
            alpha: float | Sequence[float], windows: torch.Tensor | CleanWindows | None,
            max_new_tokens: int) -> dict[str, list[float]]:
    """concept_mass, concept_words and corpus_loss for every setting (one list entry per setting).

    Every setting x held-out prompt is a row of one batch with its own head scales; alpha is one
    value or one per setting."""
    n_layers, n_heads = lm.adapter.n_layers, lm.adapter.n_heads
    prompts = list(concept.heldout)
    p = len(prompts)
    ids_t = torch.tensor(ids, dtype=torch.long)
    scales = scale_tensor(settings, alpha, n_layers, n_heads, p)
    ids_p, mask_p, pad = _left_padded(lm, prompts)
    clean = CleanPrompts(lm, ids_p.to(lm.device), mask_p.to(lm.device))
    first: list[torch.Tensor] = [torch.empty(0)] * len(settings)  # per setting: logits after each prompt (p, V)
    tokens: list[torch.Tensor] = [torch.empty(0)] * len(settings)  # per setting: continuations (p, new)
    per_chunk = editing_settings(lm.model, lm.device, lm.dtype, p, ids_p.shape[1], max_new_tokens, len(settings))
    parts: list[tuple[list[int], Any, torch.Tensor]] = []  # (settings, their prompts' cache, logits after them)
    for start, members in _by_lowest_edited_layer(scales[::p]).items():
        if start == n_layers:  # edits nothing: the clean prompts' own cache and logits
            parts += [([i], clean.cache, clean.first) for i in members]
            continue
        for c in range(0, len(members), per_chunk):
            chunk = members[c:c + per_chunk]
            with row_scales(lm, scales[_rows(chunk, p)]):
                cache, logits = clean.prefill_from(lm, start, len(chunk))
            parts.append((chunk, cache, logits))
    for b in _decode_batches(parts, per_chunk):  # every start layer decodes side by side: big batches
        order = [i for chunk, _, _ in b for i in chunk]
        logits = torch.cat([part_logits for _, _, part_logits in b])
        kv = stacked(lm.model, [cache for _, cache, _ in b], len(order) * p, max_new_tokens)
        with row_scales(lm, scales[_rows(order, p)]):
            out = _decode(lm, kv, logits, clean.mask.repeat(len(order), 1), max_new_tokens, pad)
        for j, i in enumerate(order):
            first[i], tokens[i] = logits[j * p:(j + 1) * p], out[j * p:(j + 1) * p]
    mass = [concept_mass(torch.cat(first), ids_t).cpu()]
    words = []
    if max_new_tokens:
        width = max(t.shape[1] for t in tokens)
        padded = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad) for t in tokens]
        texts = lm.tokenizer.batch_decode(torch.cat(padded).cpu(), skip_special_tokens=True)
        words = [count_concept_words(t, concept) for t in texts]
    result = {"concept_mass": torch.cat(mass).view(len(settings), p).mean(1).tolist()}
    if max_new_tokens:
        result["concept_words"] = torch.tensor(words, dtype=torch.float).view(len(settings), p).mean(1).tolist()
    if windows is not None:
        result["corpus_loss"] = corpus_loss(lm, windows, settings, alpha)
    return result


def _rows(settings: list[int], p: int) -> torch.Tensor:
    """Batch rows of the settings, `p` prompts each, setting-major."""
    return torch.cat([torch.arange(i * p, (i + 1) * p) for i in settings])


def _decode_batches(parts: list[tuple[list[int], Any, torch.Tensor]], most: int
                    ) -> list[list[tuple[list[int], Any, torch.Tensor]]]:
    """Consecutive parts cut into batches of at most `most` settings (a lone bigger part stays whole)."""
    out: list[list[tuple[list[int], Any, torch.Tensor]]] = [[]]
    for part in parts:
        if out[-1] and sum(len(chunk) for chunk, _, _ in out[-1]) + len(part[0]) > most:
            out.append([])
        out[-1].append(part)
    return out if out[0] else []


class CleanWindows:
    """Corpus windows with their clean block inputs: an edit that starts at layer l changes nothing
    below it, so its forward resumes from the cached residual at l (workers/hooks.py)."""

    def __init__(self, lm: LoadedModel, windows: torch.Tensor) -> None:
        self.windows = windows  # (n, T)
        with torch.inference_mode(), block_inputs(lm.adapter) as resid:
            logits = lm.model(windows.to(lm.device), use_cache=False).logits
        self.resid = resid  # per layer (n, T, d_model)
        self.loss = float(_ce(logits, windows).mean())


def _by_lowest_edited_layer(scales: torch.Tensor) -> dict[int, list[int]]:
    """Setting indices grouped by their lowest edited layer (n_layers: edits nothing); scales (settings,
    layers, heads)."""
    n_layers = scales.shape[1]
    groups: dict[int, list[int]] = {}
    for i in range(len(scales)):
        edited = (scales[i] != 1).any(1).nonzero().flatten().tolist()
        groups.setdefault(edited[0] if edited else n_layers, []).append(i)
    return dict(sorted(groups.items()))


def _ce(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Per-window mean next-token cross-entropy: logits (rows, T, V) over windows (rows, T) -> (rows,)."""
    vocab = logits.shape[-1]
    target = windows[:, 1:].to(logits.device)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), target.reshape(-1), reduction="none")
    return ce.view(target.shape).mean(1).cpu()


@torch.inference_mode()
def corpus_loss(lm: LoadedModel, windows: torch.Tensor | CleanWindows, settings: Sequence[Heads],
                alpha: float | Sequence[float]) -> list[float]:
    """Mean next-token cross-entropy on windows (n, T) under each setting: one value per setting.

    Settings are grouped by their lowest edited layer; each group's forward resumes there."""
    clean = windows if isinstance(windows, CleanWindows) else CleanWindows(lm, windows)
    n, width = clean.windows.shape
    n_layers, n_heads = lm.adapter.n_layers, lm.adapter.n_heads
    scales = scale_tensor(settings, alpha, n_layers, n_heads, 1)  # (settings, layers, heads)
    out = [clean.loss] * len(settings)  # a setting that edits nothing (or scales by 1) is the clean run
    per_setting = loss_settings(lm.model, lm.device, lm.dtype, n, width, len(settings))
    for start, members in _by_lowest_edited_layer(scales).items():
        if start == n_layers:
            continue
        for c in range(0, len(members), per_setting):
            chunk = members[c:c + per_setting]
            rows = clean.windows.repeat(len(chunk), 1)
            resid = clean.resid[start].repeat(len(chunk), 1, 1)
            with resumed_at(lm.adapter, start, resid), row_scales(lm, scales[chunk].repeat_interleave(n, dim=0)):
                logits = lm.model(rows.to(lm.device), use_cache=False).logits
            losses = _ce(logits, rows).view(len(chunk), n).mean(1)
            for i, value in zip(chunk, losses.tolist(), strict=True):
                out[i] = value
    return out


def verify(lm: LoadedModel, concepts: list[Concept], tokens: dict[str, ConceptTokens],
           scores: dict[str, torch.Tensor], ll_scores: dict[str, torch.Tensor],
           config: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The editing check for every concept and k: rows for `edits` and summaries for `run_metrics`."""
    grid = config["verify"]
    n_layers, n_heads = lm.adapter.n_layers, lm.adapter.n_heads
    corpus = load_corpus(config.get("corpus"), config.get("text_field", "text"))
    windows = (token_windows(corpus, lm.tokenizer, grid["window"], grid["loss_windows"], bos_id(lm.tokenizer))
               if grid["loss_windows"] else None)  # 0 windows: no side-effect measurement
    ks = k_values(n_layers * n_heads, grid["k_fractions"])
    edits: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    clean = CleanWindows(lm, windows) if windows is not None else None
    for concept in concepts:
        t0 = time.perf_counter()
        picks: list[tuple[int, float, dict[str, Heads]]] = []
        settings: list[Heads] = [[]]  # setting 0: the unedited model
        alphas: list[float] = [1.0]
        setting_k: list[int | None] = [None]
        for k in ks:
            picked = top_heads(scores[concept.name], k)
            named: dict[str, Heads] = {"pursuit": picked, "logit-lens": top_heads(ll_scores[concept.name], k)}
            for draw in range(grid["n_random"]):
                rng = random.Random(f"{config['seed']}:{concept.name}:{k}:{draw}")
                named[f"random-{draw}"] = layer_matched_random(picked, n_layers, n_heads, rng)
            for alpha in grid["alphas"]:
                picks.append((k, alpha, named))
                settings += named.values()
                alphas += [alpha] * len(named)
                setting_k += [k] * len(named)
        measured: dict[str, list[float | None]] = {
            metric: list(values) for metric, values in
            measure(lm, concept, tokens[concept.name].ids, settings, alphas, None, grid["max_new_tokens"]).items()}
        if clean is not None:  # the side effect: for every setting, or the unedited one and the largest k's
            loss_ks = set(ks) if grid.get("loss_at", "every") == "every" else {max(ks)}
            wanted = [0] + [i for i, k in enumerate(setting_k) if k in loss_ks]
            losses = corpus_loss(lm, clean, [settings[i] for i in wanted], [alphas[i] for i in wanted])
            measured["corpus_loss"] = [None] * len(settings)
            for i, loss in zip(wanted, losses, strict=True):
                measured["corpus_loss"][i] = loss
        before = {metric: values[0] for metric, values in measured.items()}
        at = 1
        for k, alpha, named in picks:
            for metric, values in measured.items():
                window = values[at:at + len(named)]
                after = [value for value in window if value is not None]
                if len(after) < len(window):  # not measured at this k (loss_at = largest)
                    continue
                unedited = before[metric]
                assert unedited is not None, "the unedited setting (index 0) is measured for every metric"
                for (selection, heads), value in zip(named.items(), after, strict=True):
                    edits.append({"edit_id": f"{concept.name}:k={k}:alpha={alpha:g}:{selection}:{metric}",
                                  "concept": concept.name, "k": k, "alpha": alpha, "selection": selection,
                                  "heads": [list(h) for h in heads], "metric": metric,
                                  "before": unedited, "after": value})
                summaries.append(summary(concept.name, k, alpha, metric, unedited,
                                         dict(zip(named, after, strict=True))))
            at += len(named)
        log.info("verified %s (%d settings) in %.1fs", concept.name, len(settings), time.perf_counter() - t0)
    return edits, summaries


def summary(concept: str, k: int, alpha: float, metric: str, before: float,
            after: dict[str, float]) -> dict[str, Any]:
    """after/before for pursuit, logit-lens and the random draws (median, IQR, range)."""
    if not before:  # nothing to lower (e.g. no concept word before the edit): keep raw values, no ratio
        return {"metric": f"pursuit.verify.{concept}.k{k}.alpha{alpha:g}.{metric}", "value": None,
                "detail": json.dumps({"before": before, "after": after, "ratio": None})}
    ratio = {name: value / before for name, value in after.items()}
    rand = torch.tensor([v for n, v in ratio.items() if n.startswith("random-")])
    detail = {"before": before, "pursuit": ratio["pursuit"], "logit_lens": ratio["logit-lens"],
              "random_median": float(rand.median()) if len(rand) else None,
              "random_q1": float(rand.quantile(0.25)) if len(rand) else None,
              "random_q3": float(rand.quantile(0.75)) if len(rand) else None,
              "random_min": float(rand.min()) if len(rand) else None,
              "random_max": float(rand.max()) if len(rand) else None}
    lower = alpha < 1  # suppression should lower the concept metrics; enhancement raise them
    if len(rand) and metric != "corpus_loss":
        beats = ratio["pursuit"] < rand.min() if lower else ratio["pursuit"] > rand.max()
        detail["beats_every_random"] = bool(beats)
    return {"metric": f"pursuit.verify.{concept}.k{k}.alpha{alpha:g}.{metric}", "value": ratio["pursuit"],
            "detail": json.dumps(detail)}


def edit_prompt(lm: LoadedModel, heads: Heads, alpha: float, prompt: str, concept: str | None = None,
                max_new_tokens: int = 24) -> dict[str, Any]:
    """Greedy continuation of one prompt before and after scaling `heads` by alpha (both in one batch)."""
    found = load_concepts(concept)[0] if concept else None
    settings: list[Heads] = [[], heads]
    scales = scale_tensor(settings, alpha, lm.adapter.n_layers, lm.adapter.n_heads, 1)
    ids, mask, pad = _left_padded(lm, [prompt, prompt])
    with torch.inference_mode(), row_scales(lm, scales):
        logits, out = greedy(lm, ids.to(lm.device), mask.to(lm.device), max_new_tokens, pad)  # one prefill
    before, after = lm.tokenizer.batch_decode(out.cpu(), skip_special_tokens=True)
    result: dict[str, Any] = {"prompt": prompt, "heads": [list(h) for h in heads], "alpha": alpha,
                              "before": before, "after": after}
    if found is not None:
        from workers.concepts import concept_token_ids

        mass = concept_mass(logits, concept_token_ids(found, lm.tokenizer, lm.adapter.unembed.weight.shape[0]))
        result.update({"concept": found.name, "mass_before": float(mass[0]), "mass_after": float(mass[1]),
                       "words_before": count_concept_words(before, found),
                       "words_after": count_concept_words(after, found)})
    return result


def edit_from_atlas(db: str, model: str, concept: str, k: int, alpha: float, prompt: str,
                    heads: Heads | None = None, max_new_tokens: int = 24) -> dict[str, Any]:
    """`atlas edit`: read the concept's top-k heads from the atlas (unless given), load the model, edit."""
    from atlas.concepts import top_heads as atlas_top_heads
    from atlas.store import Atlas
    from workers.models import load, resolve

    source = resolve(model)
    if heads is None:
        with Atlas(db) as atlas:
            heads = atlas_top_heads(atlas, source.key, concept, k)
    return edit_prompt(load(source, "auto"), heads, alpha, prompt, concept, max_new_tokens)
