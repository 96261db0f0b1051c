"""A cost model: what a build will run, and how long it will take, from configs alone (no weights).

Per unit (model x family x config) it counts the work the family's code does (docs/cost-model.md):

- `forward_tokens`: tokens through the decoder blocks, in full-forward equivalents (a forward resumed at
  layer l counts (L - l) / L per token; a backward counts two forwards);
- `attention_pairs`: (query, key) pairs per layer, summed over sequences (T^2 for eager attention, T^2 / 2
  for causal sdpa, the cache length per decode row);
- `logit_rows`: positions that reach the unembedding;
- `decode_steps`: batched one-token steps; each reads every weight once, so on a GPU it costs the time
  to stream the weights, whatever the rows;
- `host_flops`: arithmetic the family does on the host CPU whatever the device (pursuit's SOMP and its
  full-vocabulary readout), and `device_flops`: other arithmetic on the device (the lens readout).

FLOPs = 2 * block_params * forward_tokens + 4 * L * H * d_head * attention_pairs
        + 2 * vocab * d_model * logit_rows + device_flops;
wall  = FLOPs / (peak * MFU) + decode_steps * weight_bytes / bandwidth + host_flops / host_rate.

`peak * MFU` and the bandwidth come from a device profile: measured (`calibrate`, a short timing of one
random-weight block of the model's own shape on this machine) or assumed (`PROFILES`, data-sheet peaks
with the MFU stated there). Peak memory = weights + the family's activations at the minibatch
workers/batching.py picks for the profile's memory + KV cache rows. Torch-free unless calibrating.

Counts that depend on the tokenizer (prompt lengths of the IOI, concept and held-out prompts) use the
typical lengths in PROMPT_TOKENS; the token windows and needle prompts are exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from atlas.errors import BadInput
from workers.batching import (
    MEMORY_FRACTION,
    Shape,
    ablation_copy_bytes,
    captured_z_bytes,
    eager_attention_bytes,
    forward_bytes,
    kv_cache_bytes,
)

#: typical prompt lengths in tokens, BOS included (SmolLM2, Gemma 3 and Llama 3 tokenizers agree within ~20%)
PROMPT_TOKENS = {"ioi": 16, "concept": 9, "heldout": 8, "pursuit_sample": 10}
#: concepts in the built-in set (workers/data/concepts/builtin.toml), when a config does not list them
BUILTIN_CONCEPTS = 12
HELDOUT_PER_CONCEPT = 8


@dataclass(frozen=True)
class Profile:
    """A device's speed and size. `flops` is the sustained rate of model forwards (peak x MFU);
    `bandwidth` the rate weights stream in a decode step; `host_flops` the host CPU's rate."""

    name: str
    flops: float
    bandwidth: float
    memory: float  # bytes of device memory
    host_flops: float
    dtype: str
    source: str  # how the figures were obtained: "assumed: ..." or "measured: ..."
    overhead_s: float = 2e-4  # per layer per forward call: kernel launches, Python
    call_s: float = 0.0  # per forward call, whatever its depth (embedding, masks, Python)


#: assumed figures (data-sheet peaks; MFU 0.4 for the forwards, 0.7 of HBM bandwidth, a 32-core host)
PROFILES: dict[str, Profile] = {
    "h100": Profile("h100", 989e12 * 0.4, 3.35e12 * 0.7, 80e9, 1e12, "bfloat16",
                    "assumed: H100 SXM bf16 dense peak 989 TFLOP/s x MFU 0.4, 3.35 TB/s x 0.7, 80 GB"),
    "h200": Profile("h200", 989e12 * 0.4, 4.8e12 * 0.7, 141e9, 1e12, "bfloat16",
                    "assumed: H200 bf16 dense peak 989 TFLOP/s x MFU 0.4, 4.8 TB/s x 0.7, 141 GB"),
    "cpu": Profile("cpu", 6e10, 1e10, 16e9, 6e10, "float32",
                   "assumed: the 2-core development CPU of docs/build-time.md, 30 GMAC/s sustained float32",
                   overhead_s=5e-4),
}


@dataclass
class Work:
    """What one unit runs (see the module docstring)."""

    forwards: int = 0
    forward_tokens: float = 0.0
    attention_pairs: float = 0.0
    logit_rows: float = 0.0
    decode_steps: float = 0.0
    device_flops: float = 0.0
    host_flops: float = 0.0
    host_seconds: float = 0.0  # host time that no FLOP rate sets (Python per SOMP step, per vocabulary id)
    activation_bytes: float = 0.0  # peak activations beside the weights
    batch: int | None = None  # the minibatch (sequences or decode rows) chosen for the profile's memory
    notes: list[str] = field(default_factory=list)

    def add(self, other: Work) -> Work:
        return Work(self.forwards + other.forwards, self.forward_tokens + other.forward_tokens,
                    self.attention_pairs + other.attention_pairs, self.logit_rows + other.logit_rows,
                    self.decode_steps + other.decode_steps, self.device_flops + other.device_flops,
                    self.host_flops + other.host_flops, self.host_seconds + other.host_seconds,
                    max(self.activation_bytes, other.activation_bytes),
                    self.batch or other.batch, self.notes + other.notes)


@dataclass
class Estimate:
    """A unit's work priced on a profile."""

    family: str
    work: Work
    flops: float
    seconds: float
    peak_bytes: float
    weight_bytes: float

    def row(self) -> dict[str, Any]:
        w = self.work
        return {"family": self.family, "forwards": w.forwards, "tokens": round(w.forward_tokens),
                "logit_rows": round(w.logit_rows), "decode_steps": round(w.decode_steps),
                "batch": w.batch, "tflop": round(self.flops / 1e12, 3),
                "host_tflop": round(w.host_flops / 1e12, 3),
                "peak_gb": round(self.peak_bytes / 1e9, 2), "seconds": round(self.seconds, 1),
                "notes": "; ".join(w.notes)}


# -- work per family ------------------------------------------------------------------------------------
def _fit(wanted: int, per_item: float, room: float) -> int:
    return max(1, min(wanted, int(room // per_item))) if per_item > 0 else wanted


def patterns_work(s: Shape, c: dict[str, Any], room: float, elem: int) -> Work:
    t, b = 1 + 2 * c["n"], c["batch"]
    per_seq = forward_bytes(s, t, elem) + eager_attention_bytes(s, t, elem)
    step = _fit(b, per_seq, room)
    # the scores: ~20 elementwise operations per attention weight (products with 3 targets, entropy, sums)
    return Work(forwards=math.ceil(b / step), forward_tokens=b * t, attention_pairs=b * t * t, logit_rows=b,
                device_flops=20.0 * s.n_layers * s.n_heads * b * t * t, activation_bytes=step * per_seq, batch=step)


def lens_work(s: Shape, c: dict[str, Any], room: float, elem: int) -> Work:
    t, n = c["window"], c["windows"]
    per_seq = forward_bytes(s, t, elem) + captured_z_bytes(s, t)
    step = _fit(min(n, c["batch"]), per_seq, room)
    hd = s.n_heads * s.d_head
    readout = 2.0 * n * t * s.n_layers * hd * s.d_model  # next-token rows into head space, every layer
    top = 2.0 * s.n_layers * s.n_heads * s.vocab * (s.d_head + s.d_model)  # mean DLA over the vocabulary
    return Work(forwards=math.ceil(n / step), forward_tokens=n * t, attention_pairs=n * t * t / 2, logit_rows=n,
                device_flops=readout + top, activation_bytes=step * per_seq, batch=step)


def _probe(b: int, t: int, positions: int) -> tuple[int, int, int]:
    return b, t, positions


def ablation_work(s: Shape, c: dict[str, Any], room: float, elem: int) -> Work:
    n_concepts = len(c.get("concept_hashes") or {}) if c.get("concept_hashes") is not None else 0
    probes = [_probe(c["windows"], c["window"], c["window"] - 1),
              _probe(c["induction_batch"], 1 + 2 * c["induction_n"], c["induction_n"] - 1),
              _probe(2 * c["ioi_prompts"], PROMPT_TOKENS["ioi"], 1),  # clean + ABC (the mean's reference)
              _probe(n_concepts * c["concept_prompts"], PROMPT_TOKENS["concept"], 1)]
    heads, layers = s.n_layers * s.n_heads, s.n_layers
    resumed = (layers + 1) / (2 * layers)  # mean share of the blocks a forward resumed at a head's layer runs
    w = Work()
    exact, atp = c["method"] in ("exact", "both"), c["method"] in ("atp", "both")
    for b, t, k in probes:
        if b == 0:
            continue
        tokens = b * t
        if exact:
            # one stacked copy per head, resumed at its layer: as many copies per forward as the memory left
            # beside the clean cache (every layer's block input and z) holds (exact.heads_per_forward)
            cache = layers * b * t * (s.d_model + s.n_heads * s.d_head) * 4
            per_copy = ablation_copy_bytes(s, b, t, k, elem)
            copies = _fit(s.n_heads, per_copy, room - cache)
            w = w.add(Work(forwards=1 + layers * math.ceil(s.n_heads / copies),
                           forward_tokens=tokens * (1 + heads * resumed),
                           attention_pairs=b * t * t / 2 * (1 + heads * resumed),
                           logit_rows=b * k * (1 + heads),
                           activation_bytes=copies * per_copy + cache, batch=copies))
        if atp:  # a forward and a backward (two forwards' worth) per probe set, QK-fixed terms per layer
            w = w.add(Work(forwards=2, forward_tokens=3 * tokens, attention_pairs=3 * b * t * t / 2,
                           logit_rows=3 * b * k,
                           device_flops=4.0 * layers * s.n_heads * s.d_head * b * t * t,
                           activation_bytes=b * t * layers * (3 * s.d_model + 3 * s.d_ff) * 4))
    w.notes.append(f"{len(probes)} probe sets; IOI/concept prompts ~{PROMPT_TOKENS['ioi']}/"
                   f"{PROMPT_TOKENS['concept']} tokens")
    return w


# -- pursuit's host arithmetic (workers/families/pursuit/somp.py), priced from timers --------------------------
# Fitted on the 2-core development CPU with one thread (bench/bench_pursuit.py --host-cost; docs/cost-model.md):
# SOMP runs in float64, where a multiply-add costs FLOAT64 times a float32 one at the calibrated rate; each step
# rescans every (head, atom, row) correlation (score, mask, rank-1 update: memory-bound), SOMP_ELEMENT FLOP-
# equivalents apiece, and with per-head dictionaries (the readout's shortlists) computes one Gram row, GRAM_ELEMENT
# per (head, atom, d_model) entry; SOMP_STEP_S of Python per step. The shortlist's top-k keeps TOPK_ELEMENT per
# (head, vocabulary id). CONTROL_POOL_S: the same-kind word pools, Python over every vocabulary id, once.
FLOAT64 = 2.0
SOMP_ELEMENT = 140.0
GRAM_ELEMENT = 95.0
SOMP_STEP_S = 2e-4
TOPK_ELEMENT = 2800.0
CONTROL_POOL_S = 5e-6
READOUT_CHUNK = 16384  # vocabulary rows per shortlist step (pursuit.readout's chunk)


def ids_per_word(s: Shape) -> float:
    """Single-token dictionary ids per concept word (of its six variants), typical: 1.9 on SmolLM2's 49k
    vocabulary, 3.0 on Gemma 3's 262k (the built-in concepts)."""
    return 3.0 if s.vocab >= 100_000 else 2.0


def somp_price(s: Shape, heads: int, atoms: int, rows: int, steps: int, shared: bool) -> tuple[float, float]:
    """(host FLOP-equivalents, host seconds) of one `somp_heads` call on `heads` heads, `atoms` dictionary
    rows (shared, or one dictionary per head), `rows` rows of X per head, `steps` steps; the EVR denominator
    (`output_variance`) is priced by the caller, which computes it once per ranking."""
    steps = min(steps, atoms)
    setup = 2.0 * heads * atoms * s.d_head * (s.d_model + rows)  # D W_O^T, then its correlations with X
    if shared:
        setup += 2.0 * atoms * atoms * s.d_model  # the atoms' Gram matrix, once for every head
    loop = SOMP_ELEMENT * steps * heads * atoms * rows
    if not shared:
        loop += GRAM_ELEMENT * steps * heads * atoms * s.d_model  # the chosen atom's Gram row, per step
    return FLOAT64 * setup + loop, SOMP_STEP_S * steps


def output_variance_flops(s: Shape, heads: int, rows: int) -> float:
    """`output_variance`: X (W_O W_O^T) X^T per head, float64."""
    return FLOAT64 * 2.0 * heads * s.d_head * s.d_head * (s.d_model + rows)


def ranking_price(s: Shape, c: dict[str, Any], samples: int) -> tuple[float, float]:
    """(host FLOP-equivalents, host seconds) of `rank_concepts`: SOMP over each concept's dictionary and its
    control dictionaries, the EVR denominator once, the logit-lens baseline, the control pools."""
    heads = s.n_layers * s.n_heads
    rows = samples if c["criterion"] == "l1" else s.d_head  # l2 reads the full-rank covariance factor
    dictionaries = 1 + c["control"]["dictionaries"]
    flops, seconds = output_variance_flops(s, heads, rows), 0.0
    for concept in c["concepts"]:  # the family's config lists every concept with its words
        n_ids = max(1, round(len(concept["words"]) * ids_per_word(s)))
        steps = max(1, min(c["steps"], int(c.get("max_step_fraction", 1.0) * n_ids)))
        f, t = somp_price(s, heads, n_ids, rows, steps, shared=True)
        flops += dictionaries * f + 2.0 * heads * s.d_model * (s.d_head + n_ids)  # + the logit-lens baseline
        seconds += dictionaries * t
    if c["criterion"] == "l2":
        flops += FLOAT64 * 10.0 * heads * s.d_head ** 3  # eigh of every head's scatter
    if c["control"]["dictionaries"]:
        seconds += CONTROL_POOL_S * s.vocab
    return flops, seconds


def readout_price(s: Shape, c: dict[str, Any]) -> tuple[float, float, float]:
    """(host FLOP-equivalents, host seconds, device FLOPs) of `readout`: two covariance factors and SOMP on
    each layer's shortlists on the host; the full-vocabulary shortlist on the unembedding's device."""
    heads, r = s.n_layers * s.n_heads, c["readout"]
    flops = FLOAT64 * 2 * 10.0 * heads * s.d_head ** 3  # eigh of every head's scatter, twice
    candidates = min(r["candidates"], s.vocab)
    f, seconds = somp_price(s, s.n_heads, candidates, s.d_head, r["atoms"], shared=False)
    flops += s.n_layers * (f + output_variance_flops(s, s.n_heads, s.d_head))
    shortlist = 2.0 * s.vocab * s.d_model * heads * r["shortlist_rank"] \
        + TOPK_ELEMENT * heads * (s.vocab + math.ceil(s.vocab / READOUT_CHUNK) * candidates)
    return flops, s.n_layers * seconds, shortlist


def pursuit_work(s: Shape, c: dict[str, Any], room: float, elem: int) -> Work:
    concepts = c.get("concepts") or []
    n_concepts = len(concepts) or BUILTIN_CONCEPTS
    # the first samples_per_concept training prompts of every concept
    samples = sum(min(len(concept["prompts"]), c["samples_per_concept"]) for concept in concepts) \
        if concepts else n_concepts * c["samples_per_concept"]
    t = PROMPT_TOKENS["pursuit_sample"]
    batch = _fit(c["batch"], forward_bytes(s, t, elem), room)  # pursuit.pooling_batch
    w = Work(forwards=math.ceil(samples / batch), forward_tokens=samples * t,
             attention_pairs=samples * t * t / 2, logit_rows=samples, batch=batch)
    ranking, ranking_s = ranking_price(s, c, samples)
    readout, readout_s, w.device_flops = readout_price(s, c)
    w.host_flops, w.host_seconds = ranking + readout, ranking_s + readout_s
    w.activation_bytes = batch * forward_bytes(s, t, elem)
    v = c["verify"]
    if v.get("grid", "off") != "off":
        ks = len(v["k_fractions"])
        per_k = 2 + v["n_random"]
        settings = 1 + ks * len(v["alphas"]) * per_k
        resumed = 0.6  # edits start at the selected heads' lowest layer; layer-matched random sets too
        rows = settings * HELDOUT_PER_CONCEPT
        prompt = PROMPT_TOKENS["heldout"]
        new = v["max_new_tokens"]
        # settings per prefill/decode batch and per loss forward: batching.editing_settings / loss_settings
        per_setting = HELDOUT_PER_CONCEPT * (kv_cache_bytes(s, prompt + new, elem)
                                             + forward_bytes(s, prompt, elem, logits_rows=2))
        batched = _fit(settings, per_setting, room)
        verify = Work(forwards=n_concepts * (1 + new), forward_tokens=n_concepts * rows * (prompt * resumed + new),
                      attention_pairs=n_concepts * rows * (prompt * prompt / 2 + new * (prompt + new / 2)),
                      logit_rows=n_concepts * rows * (1 + new), decode_steps=n_concepts * new,
                      activation_bytes=batched * per_setting)
        if v.get("loss_windows"):
            loss_settings = 1 + (ks if v.get("loss_at") == "every" else 1) * len(v["alphas"]) * per_k
            tokens = n_concepts * loss_settings * v["loss_windows"] * v["window"]
            per_loss = v["loss_windows"] * forward_bytes(s, v["window"], elem, logits_rows=3 * v["window"])
            verify = verify.add(Work(forwards=n_concepts * loss_settings, forward_tokens=tokens * resumed,
                                     attention_pairs=tokens * v["window"] / 2, logit_rows=tokens,
                                     activation_bytes=_fit(loss_settings, per_loss, room) * per_loss))
        w = w.add(verify)
    w.notes.append(f"SOMP on the host CPU: {w.host_flops / 1e12:.2f} TFLOP-equivalents (float64, memory-bound "
                   f"steps) + {w.host_seconds:.1f} s of Python; readout shortlist on the device")
    return w


def retrieval_grid(s: Shape, c: dict[str, Any]) -> list[int]:
    """The haystack lengths RetrievalFamily.grid picks for a model of this context."""
    from workers.families.retrieval.needles import length_grid

    longest = min(c["max_context"], s.context - c["max_new_tokens"] - 1)
    if c["n_lengths"]:
        return length_grid(longest, c["n_lengths"], min(c["min_length"], longest))
    lengths, x = [], min(c["min_length"], longest)
    while x < longest:
        lengths.append(x)
        x *= 2
    return [*lengths, longest]


def retrieval_work(s: Shape, c: dict[str, Any], room: float, elem: int) -> Work:
    lengths = retrieval_grid(s, c)
    depths = [d / 100 for d in c["depths"]]
    needles = len(c["needles"])
    new = c["max_new_tokens"]
    prefix = not s.sliding_window
    # deepest needle first: each prompt re-prefills from its needle on (off for sliding-window caches)
    share = (1 + sum(1 - d for d in sorted(depths)[:-1])) / len(depths) if prefix else 1.0
    w = Work()
    for length in lengths:
        tests = needles * len(depths)
        per_row = kv_cache_bytes(s, length + new, elem)
        rows = _fit(32, per_row, room - forward_bytes(s, length, elem)) if prefix else 1
        prefilled = tests * length * share
        batches = math.ceil(tests / rows)
        w = w.add(Work(forwards=tests + batches * new, forward_tokens=prefilled + tests * new,
                       attention_pairs=prefilled * length / 2 + tests * new * length * 2,  # + the argmax probe
                       logit_rows=tests * (1 + new), decode_steps=batches * new,
                       activation_bytes=rows * per_row + forward_bytes(s, length, elem), batch=rows))
    if c["mask_k"] and c["mask_max_tests"]:
        length, masks = lengths[-1], 1 + c["mask_random_seeds"]
        tests = c["mask_max_tests"]
        per_row = kv_cache_bytes(s, length + new, elem)
        rows = _fit(32, per_row, room - forward_bytes(s, length, elem)) if prefix else masks
        batches = math.ceil(tests * masks / max(rows, masks))
        w = w.add(Work(forwards=tests + batches * new, forward_tokens=tests * length * share + tests * masks * new,
                       attention_pairs=tests * length * share * length / 2 + tests * masks * new * length,
                       logit_rows=tests * masks * new, decode_steps=batches * new))
    w.notes.append(f"{needles * len(depths) * len(lengths)} needle tests at {lengths}; decode of "
                   f"{new} tokens each (an upper bound: answers stop at a newline)")
    return w


def circuits_work(s: Shape, c: dict[str, Any], room: float, elem: int) -> Work:
    """Weight-only (workers/families/circuits.py): no forward. W_U^T W_E over the vocabulary; per layer the
    OV copying matrices and their eigenvalues, four d_head x d_head Gram roots per head; with composition,
    every later layer's three reader factors against every earlier layer's writers ((H d_head) x d_model x
    (H d_head) per pair and kind: the L^2 term). Eigen-decompositions run in float64 on one host thread."""
    h, kv, d, dh, layers = s.n_heads, s.n_kv_heads, s.d_model, s.d_head, s.n_layers
    device = 2.0 * s.vocab * d * d  # W_U^T W_E
    per_layer = 2.0 * kv * d * d * dh + 2.0 * h * dh * d * dh  # copying: (W_U^T W_E) W_V, then W_O (..)
    per_layer += 2.0 * h * dh * dh * d * (4 + 1 + 3)  # four Gram matrices, the writer, three readers
    device += layers * per_layer
    eig = FLOAT64 * layers * h * dh ** 3 * (25.0 + 4 * 10.0)  # eigvals of the copying matrix, four eigh
    pairs = layers * (layers - 1) / 2 if c["composition"] else 0
    device += pairs * 3 * 2.0 * (h * dh) ** 2 * d
    w = Work(device_flops=device, host_flops=eig,
             activation_bytes=4.0 * (d * d + layers * h * dh * d + 3 * h * d * dh + (layers * h) ** 2))
    w.notes.append(f"weights only; composition over {pairs:.0f} layer pairs" if pairs else "weights only")
    return w


def examples_work(s: Shape, c: dict[str, Any], room: float, elem: int) -> Work:
    """Corpus windows through eager attention, each layer's weights reduced to per-head top-k candidates
    inside the layer (workers/families/examples.py, as patterns does), one logit row per window."""
    t, n = c["window"], c["windows"]
    per_seq = forward_bytes(s, t, elem) + eager_attention_bytes(s, t, elem)
    step = _fit(c["batch"], per_seq, room)
    scores = 2.0 * n * s.n_layers * s.n_heads * (t * t + 2 * t * s.d_head ** 2)  # max attention, write norms
    return Work(forwards=math.ceil(n / step), forward_tokens=n * t, attention_pairs=n * t * t, logit_rows=n,
                device_flops=scores, activation_bytes=step * per_seq, batch=step)


WORK = {"patterns": patterns_work, "lens": lens_work, "ablation": ablation_work, "pursuit": pursuit_work,
        "retrieval": retrieval_work, "circuits": circuits_work, "examples": examples_work}


# -- pricing ------------------------------------------------------------------------------------------------
def weight_bytes(s: Shape, dtype: str) -> float:
    from workers.batching import dtype_bytes

    return float(s.params * dtype_bytes(dtype))


def estimate(s: Shape, family: str, config: dict[str, Any], profile: Profile, devices: int = 1) -> Estimate:
    """Price one unit: its work at the minibatch the profile's memory allows, in FLOPs, seconds and bytes.
    `devices` > 1 spreads the weights (device_map="auto"): memory adds up, speed does not (layers run in turn)."""
    from workers.batching import dtype_bytes

    if family not in WORK:
        raise BadInput(f"the cost model has no formula for family '{family}'",
                       f"families it prices: {', '.join(WORK)}")
    elem = dtype_bytes(profile.dtype)
    weights = weight_bytes(s, profile.dtype)
    room = (profile.memory * devices - weights) * MEMORY_FRACTION
    if room <= 0:
        raise BadInput(f"the weights ({weights / 1e9:.0f} GB in {profile.dtype}) do not fit {devices} x "
                       f"{profile.memory / 1e9:.0f} GB ({profile.name})", "pass more --devices, or a bigger device")
    work = WORK[family](s, config, room, elem)
    flops = (2.0 * s.block_params * work.forward_tokens + 4.0 * s.n_layers * s.n_heads * s.d_head
             * work.attention_pairs + 2.0 * s.vocab * s.d_model * work.logit_rows + work.device_flops)
    compute = flops / profile.flops
    streaming = work.decode_steps * weights / profile.bandwidth
    overhead = work.forwards * (s.n_layers * profile.overhead_s + profile.call_s)
    seconds = compute + streaming + overhead + work.host_flops / profile.host_flops + work.host_seconds
    return Estimate(family, work, flops, seconds, weights + work.activation_bytes, weights)


# -- model configs without weights ------------------------------------------------------------------------
GGUF_KEYS = ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
             "feed_forward_length", "context_length", "attention.key_length", "vocab_size",
             "attention.sliding_window")


def model_config(spec: str) -> dict[str, Any]:
    """A model's config.json as a dict, read without its weights: a config.json file, a model directory, a
    .gguf (its header), an embedded alias (its dequantized config if cached, else its GGUF header), or a
    Hugging Face repo id (config.json only, from the hub or the local cache)."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        return _json(path)
    if path.is_dir() and (path / "config.json").is_file():
        return _json(path / "config.json")
    if path.is_file() and path.suffix == ".gguf":
        return gguf_config(path)
    from workers.models import aliases, cache_root, resolve

    if spec in aliases() or path.exists():
        source = resolve(spec)
        if source.format == "gguf":
            cached = cache_root() / "models" / (source.file_hash or "")[:16] / "config.json"
            return _json(cached) if cached.is_file() else gguf_config(Path(source.path))
        return _json(Path(source.path) / "config.json")
    if spec.count("/") == 1:
        from huggingface_hub import hf_hub_download

        try:
            return _json(Path(hf_hub_download(spec, "config.json")))
        except Exception as exc:  # offline and not cached, or no such repo
            raise BadInput(f"could not read config.json of '{spec}': {type(exc).__name__}: {exc}",
                           "pass a local config.json or model directory") from None
    raise BadInput(f"no model config found for '{spec}'",
                   "pass an alias, a config.json, a model directory, a .gguf or a repo id (org/name)")


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path} is not a readable JSON config ({exc})", "pass a model's config.json") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} is not a model config (a JSON object)", "pass a model's config.json")
    return data


def gguf_config(path: Path) -> dict[str, Any]:
    """The sizes the cost model needs from a GGUF header, as config.json names them."""
    from workers.models import read_gguf_header

    arch = read_gguf_header(path, ("general.architecture",)).get("general.architecture")
    if not arch:
        raise BadInput(f"{path} names no architecture in its header", "pass a model's config.json instead")
    found = read_gguf_header(path, tuple(f"{arch}.{key}" for key in GGUF_KEYS))
    get = lambda key: found.get(f"{arch}.{key}")  # noqa: E731
    if get("block_count") is None or get("embedding_length") is None:
        raise BadInput(f"{path}'s header lacks {arch}.block_count or embedding_length", "pass its config.json")
    vocab = get("vocab_size") or _gguf_vocab(path)
    heads = int(get("attention.head_count") or 0)
    return {"model_type": arch, "num_hidden_layers": get("block_count"), "hidden_size": get("embedding_length"),
            "num_attention_heads": heads, "num_key_value_heads": get("attention.head_count_kv") or heads,
            "intermediate_size": get("feed_forward_length"), "max_position_embeddings": get("context_length"),
            "head_dim": get("attention.key_length"), "vocab_size": vocab,
            "sliding_window": get("attention.sliding_window")}


def _gguf_vocab(path: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(path)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise BadInput(f"{path} has no vocabulary size in its header", "pass its config.json")
    return len(tokens.data)


# -- calibration -----------------------------------------------------------------------------------------
def calibrate(s: Shape, device: str = "cpu", tokens: int = 512, repeats: int = 3) -> Profile:
    """Measure this machine on the model's own shape: random-weight Llama models of its widths with 1 and 3
    blocks (float32 on a CPU, bf16 on CUDA), timed on `tokens` tokens and on one token. The difference of
    the two depths gives a block's time (FLOP/s at `tokens`; weight bytes streamed per second at one token);
    what is left of the 1-block time is the fixed cost of a forward call (embedding, masks, Python)."""
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    elem = 2 if dtype == torch.bfloat16 else 4

    def model(layers: int) -> Any:
        config = LlamaConfig(hidden_size=s.d_model, intermediate_size=s.d_ff, num_attention_heads=s.n_heads,
                             num_key_value_heads=s.n_kv_heads, head_dim=s.d_head, num_hidden_layers=layers,
                             vocab_size=256, max_position_embeddings=max(tokens + 1, 512))
        with torch.device(device):
            return LlamaForCausalLM(config).to(dtype=dtype).eval()  # type: ignore[call-arg]

    def timed(m: Any, x: Any) -> float:
        """The median of `repeats` timings: a long unit on a shared host sees its typical share, not its best."""
        times = []
        with torch.inference_mode():
            m(x, logits_to_keep=1, use_cache=False)  # warm up
            for _ in range(repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(x, logits_to_keep=1, use_cache=False)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    ids = torch.randint(0, 256, (1, tokens), device=device)
    step = torch.randint(0, 256, (1, 1), device=device)
    shallow, deep = model(1), model(3)
    block_flops = 2.0 * replace(s, n_layers=1).block_params * tokens + 4.0 * s.n_heads * s.d_head * tokens * tokens / 2
    long_1, long_3 = timed(shallow, ids), timed(deep, ids)
    step_1, step_3 = timed(shallow, step), timed(deep, step)
    # a difference lost in timing noise (tiny shapes, a busy host) falls back to the deep model's mean per block
    per_block = (long_3 - long_1) / 2 if long_3 - long_1 > 0.2 * long_3 else long_3 / 3
    per_step = (step_3 - step_1) / 2 if step_3 - step_1 > 0.2 * step_3 else step_3 / 3
    flops = block_flops / per_block
    bandwidth = replace(s, n_layers=1).block_params * elem / per_step
    call = max(0.0, step_1 - per_step)
    from workers.batching import free_bytes

    name = "cuda" if device.startswith("cuda") else "cpu"
    host = flops if name == "cpu" else PROFILES["h100"].host_flops
    return Profile(name, flops, bandwidth, float(free_bytes(device)), host,
                   "bfloat16" if name == "cuda" else "float32",
                   f"measured: a {s.d_model}-wide block takes {per_block * 1e3:.0f} ms on {tokens} tokens "
                   f"({flops / 1e9:.0f} GFLOP/s) and {per_step * 1e3:.1f} ms on one ({bandwidth / 1e9:.1f} GB/s); "
                   f"a forward call costs {call * 1e3:.1f} ms more", overhead_s=0.0, call_s=call)


def plan_units(s: Shape, families: list[str], options: dict[str, Any], profile: Profile,
               devices: int = 1) -> list[Estimate]:
    """Estimates for one model and the families of one build, with the options validated as a build would;
    a family the cost model has no formula for (a plugin) is left out (`atlas plan` names it)."""
    from workers.families import get_family
    from workers.options import validate

    chosen = [get_family(name) for name in families]
    options = validate(chosen, options)
    return [estimate(s, f.name, f.config(options), profile, devices) for f in chosen if f.name in WORK]


def as_dict(e: Estimate) -> dict[str, Any]:
    return {**e.row(), "work": asdict(e.work), "flops": e.flops, "weight_bytes": e.weight_bytes}
