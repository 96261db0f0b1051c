"""Exact per-head ablation effects for every head, fast.

Removing head h of layer l changes nothing before layer l, so each ablated forward starts from the
clean residual stream cached at layer l's input and runs only layers l..L-1; the heads of one
layer are ablated together in one forward, each in its own copy of the batch stacked along the
batch dimension. With L layers this runs about (L + 1) / 2 layers per head instead of L, and big
stacked batches use the CPU better than many small forwards. Only the logit positions a metric
reads go through the unembedding (`logits_to_keep`).

Resuming: workers/hooks.py (`block_inputs`, `resumed_at`).

Replacements (per head, on z = the o_proj input, so GQA-safe; arXiv 2211.00593, 2404.15255):
zero (z <- 0); mean: on a template probe whose rows are aligned (induction: BOS + X + X; IOI: every
position the same slot of its template), z at position t <- the mean of z at t over the reference
distribution (the probe's own counterparts, IOI's ABC prompts, where it has them, else its sequences),
as IOI does; on other probes (corpus windows, concept prompts) z <- the mean over the probe's real
tokens at positions >= 1; global_mean: that position-free mean on every probe (version 2's `mean`).
Position 0 keeps its clean value under both means (it is the same in every sequence). resample
(z <- z on a counterpart sequence: the probe set's own corrupted prompts where it has them, else the
next sequence of the batch, rolled by one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.batching import ablation_copy_bytes, dtype_bytes, fit, model_shape
from workers.hooks import block_inputs, edit_z, resumed_at
from workers.models import LoadedModel

MODES = ("zero", "mean", "global_mean", "resample")
Metrics = Callable[[torch.Tensor], dict[str, torch.Tensor]]  # kept logits (B, P, V) -> {name: (B,)}


@dataclass
class Probe:
    """One probe set: its tokens, the logit positions its metrics read, and the metrics."""

    name: str
    tokens: torch.Tensor  # (B, T) long
    positions: torch.Tensor  # (P,) long, logit positions the metrics read; per_row: (B,), row i's own
    metrics: Metrics
    valid: torch.Tensor  # (B, T) bool, real tokens (padding excluded from means)
    counterpart: torch.Tensor | None = None  # (B, T) corrupted tokens for resample; None: roll
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # metric -> the batch rows it reads
    per_row: bool = False  # positions holds one position per row (last-token metrics): logits (B, 1, V)
    aligned: bool = False  # a template probe: position t is the same slot in every row and counterpart

    @property
    def n_positions(self) -> int:
        """Logit positions computed per row."""
        return 1 if self.per_row else len(self.positions)

    def logits(self, lm: LoadedModel, copies: int = 1) -> torch.Tensor:
        """Logits of the probe's tokens (stacked `copies` times) where its metrics read them."""
        tokens = self.tokens.repeat(copies, 1) if copies > 1 else self.tokens
        if self.per_row:
            return logits_per_row(lm, tokens, self.positions.repeat(copies))
        return logits_at(lm, tokens, self.positions)

    def rows_of(self, metric: str) -> torch.Tensor:
        """The batch rows a metric's per-sequence values come from (all rows unless declared)."""
        return self.rows.get(metric, torch.arange(self.tokens.shape[0]))


@dataclass
class CleanCache:
    resid: list[torch.Tensor]  # per layer, the block input (B, T, d_model)
    z: list[torch.Tensor]  # per layer, (B, T, H, d_head)
    metrics: dict[str, torch.Tensor]  # {name: (B,)}


def logits_at(lm: LoadedModel, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits at the given positions only: (B, P, V) float32."""
    out = lm.model(tokens.to(lm.device), logits_to_keep=positions.to(lm.device), use_cache=False)
    return out.logits.float()


def logits_per_row(lm: LoadedModel, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits at one position per row, (B, 1, V) float32: only those B hidden states reach the
    unembedding (a last-token metric over prompts of different lengths needs B, not B x P)."""
    index = positions.to(lm.device)

    def pick(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]  # (B, T, d_model): the final norm's output at every position
        return (hidden[torch.arange(hidden.shape[0], device=hidden.device), index][:, None], *args[1:])

    handle = lm.model.get_output_embeddings().register_forward_pre_hook(pick)
    try:  # logits_to_keep=0 hands every position to the unembedding, where `pick` keeps one per row
        out = lm.model(tokens.to(lm.device), logits_to_keep=0, use_cache=False)
    finally:
        handle.remove()
    return out.logits.float()


def clean_run(lm: LoadedModel, probe: Probe) -> CleanCache:
    """One plain forward caching each block's input and each layer's z."""
    z: dict[int, torch.Tensor] = {}

    def grab(layer: int, zl: torch.Tensor) -> None:
        z[layer] = zl.detach().clone()

    with torch.inference_mode(), block_inputs(lm.adapter) as resid, edit_z(lm.adapter, grab):
        logits = probe.logits(lm)
    return CleanCache(resid, [z[i] for i in range(lm.adapter.n_layers)], probe.metrics(logits.cpu()))


def counterpart_z(lm: LoadedModel, probe: Probe) -> list[torch.Tensor]:
    """z per layer on the resample counterparts: (B, T, H, d_head) each."""
    if probe.counterpart is None:
        raise ValueError("no counterpart tokens")
    z: dict[int, torch.Tensor] = {}
    with torch.inference_mode(), edit_z(lm.adapter, lambda lay, zl: z.__setitem__(lay, zl.detach().clone())):
        lm.model(probe.counterpart.to(lm.device), logits_to_keep=1, use_cache=False)
    return [z[i] for i in range(lm.adapter.n_layers)]


def needs_counterpart(mode: str, probe: Probe) -> bool:
    """Whether the mode reads the probe's counterparts: resample, and mean on an aligned probe (its
    reference distribution)."""
    return probe.counterpart is not None and (mode == "resample" or (mode == "mean" and probe.aligned))


def mean_kind(mode: str, probe: Probe) -> str | None:
    """What `mode` averages on this probe, for the run config (None: not a mean mode)."""
    if mode == "mean" and probe.aligned:
        return ("per position, over the counterpart prompts" if probe.counterpart is not None
                else "per position, over the probe's sequences")
    if mode in ("mean", "global_mean"):
        return "over the probe's real tokens at positions >= 1"
    return None


def replacements(mode: str, probe: Probe, z: list[torch.Tensor],
                 counter: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The ablated value of every head's z, per layer (B, T, H, d_head), for one mode."""
    out = []
    valid = probe.valid.to(z[0].device).clone()
    valid[:, 0] = False  # position 0 keeps its clean value under mean ablation
    for layer, zl in enumerate(z):
        if mode == "zero":
            rep = torch.zeros_like(zl)
        elif mode == "mean" and probe.aligned:
            reference = counter[layer] if counter is not None else zl
            w = valid.to(zl.dtype)[..., None, None]  # (B, T, 1, 1)
            count = w.sum(0)  # (T, 1, 1)
            overall = (reference * w).sum((0, 1)) / w.sum()  # a position no row reaches: the plain mean
            per_position = torch.where(count > 0, (reference * w).sum(0) / count.clamp_min(1), overall)
            rep = per_position.expand_as(zl).clone()
            rep[:, 0] = zl[:, 0]
        elif mode in ("mean", "global_mean"):
            w = valid.to(zl.dtype)[..., None, None]  # (B, T, 1, 1)
            mean = (zl * w).sum((0, 1)) / w.sum()  # (H, d_head)
            rep = mean.expand_as(zl).clone()
            rep[:, 0] = zl[:, 0]
        elif mode == "resample":
            rep = counter[layer] if counter is not None else zl.roll(1, dims=0)
        else:
            raise ValueError(f"unknown ablation mode {mode!r}; known: {', '.join(MODES)}")
        out.append(rep)
    return out


def _stacked_edit(layer: int, heads: list[int], rep: torch.Tensor, batch: int):
    """Copy j of the stacked batch gets head heads[j] replaced. rep: (B, T, H, d_head)."""

    def edit(lay: int, z: torch.Tensor) -> torch.Tensor | None:  # z: (c*B, T, H, d_head)
        if lay != layer:
            return None
        z = z.clone()
        for j, head in enumerate(heads):
            z[j * batch:(j + 1) * batch, :, head] = rep[:, :, head].to(z.dtype)
        return z

    return edit


def heads_per_forward(lm: LoadedModel, probe: Probe) -> int:
    """How many head copies go through one stacked forward: as many as fit the memory free on the model's
    device now (the clean cache already held), at one probe batch's resumed forward and kept logits each
    (workers/batching.py). The dtype is the weights' own (`float32_model` may have cast them)."""
    b, t = probe.tokens.shape
    dtype = next(lm.model.parameters()).dtype
    per_copy = ablation_copy_bytes(model_shape(lm.model), b, t, probe.n_positions, dtype_bytes(dtype))
    return fit(lm.adapter.n_heads, per_copy, device=lm.device)


def _empty_effects(n_layers: int, n_heads: int, clean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NaN-filled (L, H, n) per metric, n = that metric's own number of sequences."""
    return {name: torch.full((n_layers, n_heads, len(value)), float("nan")) for name, value in clean.items()}


def exact_effects(lm: LoadedModel, probe: Probe, cache: CleanCache, reps: list[torch.Tensor],
                  layers: list[int] | None = None, heads_per_pass: int | None = None
                  ) -> dict[str, torch.Tensor]:
    """Per-sequence effects metric(ablated) - metric(clean): {name: (L, H, n_name)}, n_name the rows
    the metric reads (a concept's own prompts); NaN where not run."""
    a = lm.adapter
    b = probe.tokens.shape[0]
    chunk = heads_per_pass or heads_per_forward(lm, probe)
    effects = _empty_effects(a.n_layers, a.n_heads, cache.metrics)
    buckets = row_buckets(probe)
    for layer in range(a.n_layers) if layers is None else layers:
        for start in range(0, a.n_heads, chunk):
            heads = list(range(start, min(start + chunk, a.n_heads)))
            c = len(heads)
            if len(buckets) == 1:
                resid = cache.resid[layer].repeat(c, 1, 1)  # (c*B, T, d_model)
                with (torch.inference_mode(), resumed_at(lm.adapter, layer, resid),
                      edit_z(a, _stacked_edit(layer, heads, reps[layer], b), [layer])):
                    logits = probe.logits(lm, copies=c).cpu()
            else:
                logits = _bucketed_logits(lm, probe, cache, reps, layer, heads, buckets)
            for j, head in enumerate(heads):
                got = probe.metrics(logits[j * b:(j + 1) * b])
                for name, value in got.items():
                    effects[name][layer, head] = value - cache.metrics[name]
    return effects


def row_buckets(probe: Probe, most: int = 3) -> list[tuple[torch.Tensor, int]]:
    """(rows, width) groups: prompts of a last-token probe sorted by length and cut where that saves
    the most padding (a right-padded batch computes every row at the longest prompt's width), into at
    most `most` groups. Other probes: one group, every row at full width."""
    b, t = probe.tokens.shape
    if not probe.per_row or b < 2:
        return [(torch.arange(b), t)]
    order = probe.positions.argsort(stable=True)
    width = (probe.positions[order] + 1).tolist()  # ascending: a group costs its size x its last width
    # (rows placed, groups used) -> (tokens, cut points)
    best: dict[tuple[int, int], tuple[int, list[int]]] = {(0, 0): (0, [])}
    for used in range(most):
        for (placed, groups), (cost, cuts) in list(best.items()):
            if groups != used or placed == b:
                continue
            for end in range(placed + 1, b + 1):
                key, total = (end, groups + 1), cost + (end - placed) * width[end - 1]
                if key not in best or total < best[key][0]:
                    best[key] = (total, [*cuts, end])
    _, cuts = min(v for (placed, _), v in best.items() if placed == b)
    starts = [0, *cuts[:-1]]
    return [(order[lo:hi], width[hi - 1]) for lo, hi in zip(starts, cuts, strict=True)]


def _bucketed_logits(lm: LoadedModel, probe: Probe, cache: CleanCache, reps: list[torch.Tensor], layer: int,
                     heads: list[int], buckets: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Per-row logits (c*B, 1, V) of the stacked ablations, each length group at its own width."""
    a, b, c = lm.adapter, probe.tokens.shape[0], len(heads)
    out: torch.Tensor | None = None
    for rows, width in buckets:
        n = len(rows)
        resid = cache.resid[layer][rows, :width].repeat(c, 1, 1)
        with (torch.inference_mode(), resumed_at(lm.adapter, layer, resid),
              edit_z(a, _stacked_edit(layer, heads, reps[layer][rows, :width], n), [layer])):
            part = logits_per_row(lm, probe.tokens[rows, :width].repeat(c, 1), probe.positions[rows].repeat(c)).cpu()
        if out is None:
            out = torch.empty(c * b, *part.shape[1:])
        for j in range(c):
            out[j * b + rows] = part[j * n:(j + 1) * n]
    assert out is not None
    return out


def naive_effects(lm: LoadedModel, probe: Probe, cache: CleanCache, reps: list[torch.Tensor],
                  heads: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The reference: one plain full forward per head. {name: (L, H, n_name)}, NaN where not run."""
    a = lm.adapter
    b = probe.tokens.shape[0]
    effects = _empty_effects(a.n_layers, a.n_heads, cache.metrics)
    for layer, head in heads:
        with torch.inference_mode(), edit_z(a, _stacked_edit(layer, [head], reps[layer], b), [layer]):
            got = probe.metrics(probe.logits(lm).cpu())
        for name, value in got.items():
            effects[name][layer, head] = value - cache.metrics[name]
    return effects


# -- the no-op check (issue 14 item 9) -----------------------------------------------------------
# Exact effects subtract a clean forward from stacked, resumed forwards. In bfloat16 those two paths
# round differently (another batch composition: per-length buckets, c stacked copies), and on the IOI
# probe the difference reached 6e-3 logits on a tiny Llama, the size of the effects themselves. The
# check ablates every head of a few layers with its own clean z (replacement = z): every "effect" must
# then be below NOOP_TOLERANCE, else the probe's exact effects are measured with the model in float32.
NOOP_TOLERANCE = 1e-4  # absolute, in the metric's units (nats, logits, probability); + NOOP_RELATIVE x |clean|
NOOP_RELATIVE = 1e-5


def noop_check_layers(n_layers: int) -> list[int]:
    """The layers the no-op check resumes at: the first (a full forward) and the last."""
    return sorted({0, n_layers - 1})


def noop_deviation(lm: LoadedModel, probe: Probe, cache: CleanCache,
                   heads_per_pass: int | None = None) -> dict[str, float]:
    """max |metric(z replaced by itself) - metric(clean)| per metric over the check layers' heads and
    the sequences: what the exact path reports for an ablation that changes nothing."""
    effects = exact_effects(lm, probe, cache, cache.z, layers=noop_check_layers(lm.adapter.n_layers),
                            heads_per_pass=heads_per_pass)
    return {name: float(values.nan_to_num(0.0).abs().max()) for name, values in effects.items()}


def noop_tolerance(cache: CleanCache, name: str) -> float:
    return NOOP_TOLERANCE + NOOP_RELATIVE * float(cache.metrics[name].abs().max())


def noop_holds(deviation: dict[str, float], cache: CleanCache) -> bool:
    return all(value <= noop_tolerance(cache, name) for name, value in deviation.items())


@contextmanager
def float32_model(lm: LoadedModel) -> Iterator[None]:
    """The model in float32 for the block (weights cast in place, cast back after: bfloat16 ->
    float32 -> bfloat16 is exact); a float32 model is left as it is."""
    dtype = next(lm.model.parameters()).dtype
    if dtype == torch.float32:
        yield
        return
    lm.model.to(torch.float32)
    try:
        yield
    finally:
        lm.model.to(dtype)
