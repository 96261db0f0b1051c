"""Head Pursuit costs, measured side by side in one run.

    .venv/bin/python bench/bench_pursuit.py [--model llama] [--settings 12] [--repeats 2]

1. Ranking: seconds to rank every head for every built-in concept (SOMP on the concept
   dictionary plus the control dictionaries), once the pooled activations are accumulated, for
   both criteria; next to the seconds the pooling forward took and the direct least-squares
   reference (`somp_reference`, one head at a time) on a few heads, extrapolated to all.
2. Editing: concept-mass evaluations per second when many head-scaling settings share one
   forward (per-row scales) against one setting per forward, same settings and prompts.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from workers.concepts import load_concepts, tokenize_concept
from workers.families.pursuit import PursuitFamily, final_gain, pooled_z, rank_concepts, readable_write, stacked_w_o
from workers.families.pursuit.editing import layer_matched_random, measure, top_heads
from workers.families.pursuit.somp import CovarianceAccumulator, somp_reference
from workers.models import load, resolve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama")
    parser.add_argument("--settings", type=int, default=12, help="head-scaling settings per concept")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference-heads", type=int, default=4)
    args = parser.parse_args()
    lm = load(resolve(args.model), "auto")
    a = lm.adapter
    config = PursuitFamily().config({"verify": "off"})
    concepts = load_concepts(None)
    n_vocab = a.unembed.weight.shape[0]
    ids = {c.name: tokenize_concept(c, lm.tokenizer, n_vocab).ids for c in concepts}
    prompts = [p for c in concepts for p in c.prompts[:config["samples_per_concept"]]]

    t0 = time.perf_counter()
    z, _ = pooled_z(lm, prompts, config["batch"])
    pool_s = time.perf_counter() - t0
    flat = z.reshape(z.shape[0], a.n_layers * a.n_heads, a.d_head)
    w_o, gain = readable_write(lm, stacked_w_o(lm)), final_gain(lm)
    acc = CovarianceAccumulator(a.n_layers * a.n_heads, a.d_head)
    acc.update(flat)
    pairs = [(c.name, ids[c.name]) for c in concepts if ids[c.name]]
    n_somp = len(pairs) * (1 + config["control"]["dictionaries"])
    print(f"{args.model}: {a.n_layers * a.n_heads} heads, {len(pairs)} concepts, {z.shape[0]} samples, "
          f"{n_somp} SOMP runs of {config['steps']} steps; pooling forward {pool_s:.1f}s")
    ranking = None
    for criterion in ("l1", "l2"):
        t0 = time.perf_counter()
        ranking = rank_concepts(lm, flat, w_o, acc, gain, pairs, {**config, "criterion": criterion})
        print(f"  rank all heads x all concepts, {criterion}: {time.perf_counter() - t0:.1f}s")
    from workers.families.pursuit import concept_rows

    name, concept_ids = pairs[0]
    dictionary = concept_rows(lm, concept_ids, gain)
    t0 = time.perf_counter()
    for head in range(args.reference_heads):
        somp_reference(flat[:, head].double() @ w_o[head].double(), dictionary, config["steps"], "l1")
    per_head = (time.perf_counter() - t0) / args.reference_heads
    print(f"  direct reference (lstsq every step), one concept dictionary: {per_head * 1000:.0f} ms/head -> "
          f"{per_head * a.n_layers * a.n_heads * n_somp:.0f}s extrapolated to all heads x {n_somp} runs")

    assert ranking is not None
    concept = next(c for c in concepts if c.name == name)
    picked = top_heads(ranking.scores[name], max(1, round(0.01 * a.n_layers * a.n_heads)))
    rng = random.Random(0)
    settings = [picked, *(layer_matched_random(picked, a.n_layers, a.n_heads, rng) for _ in range(args.settings - 1))]
    measure(lm, concept, concept_ids, settings[:1], -1.0, None, 0)  # warm-up
    batched_s = single_s = 0.0
    for _ in range(args.repeats):  # interleaved, so load drifts hit both alike
        t0 = time.perf_counter()
        together = measure(lm, concept, concept_ids, settings, -1.0, None, 0)["concept_mass"]
        batched_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        alone = [measure(lm, concept, concept_ids, [s], -1.0, None, 0)["concept_mass"][0] for s in settings]
        single_s += time.perf_counter() - t0
    gap = max(abs(x - y) for x, y in zip(together, alone, strict=True))
    n = len(settings) * args.repeats
    print(f"  editing, {len(settings)} settings x {len(concept.heldout)} prompts ({name}): batched {n / batched_s:.1f} "
          f"evals/s, one setting per forward {n / single_s:.1f} evals/s, speed-up {single_s / batched_s:.2f}x "
          f"(max |mass difference| {gap:.1e})")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
