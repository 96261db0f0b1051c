"""Head Pursuit costs, measured side by side in one run.

    .venv/bin/python bench/bench_pursuit.py [--model llama] [--settings 12] [--repeats 2]
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_pursuit.py --host-cost [--model llama]
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_pursuit.py --fit

1. Ranking: seconds to rank every head for every built-in concept (SOMP on the concept
   dictionary plus the control dictionaries), once the pooled activations are accumulated, for
   both criteria; next to the seconds the pooling forward took and the direct least-squares
   reference (`somp_reference`, one head at a time) on a few heads, extrapolated to all.
2. Editing: concept-mass evaluations per second when many head-scaling settings share one
   forward (per-row scales) against one setting per forward, same settings and prompts.

--host-cost: the family's phases with the editing check off (pooling forwards, ranking, readout), each timed
and set beside workers/cost.py's prediction on this CPU's calibrated profile (predicted / measured).
--fit: the constants of the host price (cost.FLOAT64, SOMP_ELEMENT, GRAM_ELEMENT, SOMP_STEP_S, TOPK_ELEMENT),
by least squares on `somp_heads` timed over a grid of sizes, each next to its own calibration (the host's load
drifts), and the shortlist timed on a random unembedding.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import Any

import torch

from workers import cost
from workers.batching import Shape, model_shape
from workers.concepts import load_concepts, tokenize_concept
from workers.families.pursuit import PursuitFamily, final_gain, pooled_z, rank_concepts, readable_write, stacked_w_o
from workers.families.pursuit.editing import layer_matched_random, measure, top_heads
from workers.families.pursuit.somp import CovarianceAccumulator, somp_reference
from workers.models import load, resolve


def host_cost(model: str) -> None:
    """Pooling, ranking and readout of the default config (verify off), measured and predicted."""
    from workers.families.pursuit import pooling_batch, readout

    print(f"load average before: {os.getloadavg()}, torch threads {torch.get_num_threads()}", flush=True)
    lm = load(resolve(model), "cpu")
    a, shape = lm.adapter, model_shape(lm.model)
    config = PursuitFamily().config({"verify": "off"})
    concepts = load_concepts(None)
    n_vocab = a.unembed.weight.shape[0]
    pairs = [(c.name, tokenize_concept(c, lm.tokenizer, n_vocab).ids) for c in concepts]
    pairs = [(name, ids) for name, ids in pairs if ids]
    prompts = [p for c in concepts for p in c.prompts[:config["samples_per_concept"]]]
    profile = cost.calibrate(shape, "cpu")
    t0 = time.perf_counter()
    z, _ = pooled_z(lm, prompts, pooling_batch(lm, prompts, config["batch"]))
    pool_s = time.perf_counter() - t0
    flat = z.reshape(z.shape[0], a.n_layers * a.n_heads, a.d_head)
    w_o, gain = readable_write(lm, stacked_w_o(lm)), final_gain(lm)
    acc = CovarianceAccumulator(a.n_layers * a.n_heads, a.d_head)
    acc.update(flat)
    t0 = time.perf_counter()
    rank_concepts(lm, flat, w_o, acc, gain, pairs, config)
    rank_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    readout(lm, acc, w_o, gain, config["readout"], a.n_heads)
    readout_s = time.perf_counter() - t0
    rank_f, rank_t = cost.ranking_price(shape, config, len(prompts))
    read_f, read_t, short_f = cost.readout_price(shape, config)
    unit = cost.estimate(shape, "pursuit", config, profile).seconds
    rate = profile.host_flops
    print(f"{model}: {profile.source}")
    for name, measured, predicted in (("ranking", rank_s, rank_f / rate + rank_t),
                                      ("readout", readout_s, (read_f + short_f) / rate + read_t),
                                      ("unit (pooling + ranking + readout)", pool_s + rank_s + readout_s, unit)):
        print(f"  {name}: measured {measured:.2f} s, predicted {predicted:.2f} s, "
              f"predicted / measured {predicted / measured:.2f}")
    print(f"load average after: {os.getloadavg()}")


def fit() -> None:
    """Least-squares fit of the host price's constants on timed `somp_heads` calls and shortlists."""
    from workers.families.pursuit import shortlist
    from workers.families.pursuit.somp import somp_heads

    print(f"load average before: {os.getloadavg()}, torch threads {torch.get_num_threads()}", flush=True)
    shape = Shape(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_head=64, d_ff=1536, vocab=49152,
                  context=8192, tied=True)  # SmolLM2-135M's widths
    g = torch.Generator().manual_seed(0)

    def timed(f: Any) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return sorted(times)[1]

    cases = [(h, v, m, t, True) for h in (64, 270) for v in (20, 100) for m in (16, 64) for t in (2, 40)
             if t <= v // 2 + 1] + [(h, 512, 64, t, False) for h in (9, 32) for t in (2, 10, 30)]
    features, seconds = [], []
    for heads, v, m, steps, shared in cases:
        rate = cost.calibrate(shape, "cpu").host_flops
        x = torch.randn(heads, m, shape.d_head, generator=g, dtype=torch.float64)
        w = torch.randn(heads, shape.d_head, shape.d_model, generator=g, dtype=torch.float64)
        d = torch.randn(*(() if shared else (heads,)), v, shape.d_model, generator=g)
        seconds.append(timed(lambda x=x, w=w, d=d, steps=steps: somp_heads(x, w, d, steps, "l1")))
        setup = 2.0 * heads * v * shape.d_head * (shape.d_model + m) + (2.0 * v * v * shape.d_model if shared else 0)
        setup += 2.0 * heads * shape.d_head ** 2 * (shape.d_model + m)  # output_variance, inside the call here
        gram = 0.0 if shared else steps * heads * v * shape.d_model
        features.append([setup / rate, steps * heads * v * m / rate, gram / rate, steps])
    a, y = torch.tensor(features, dtype=torch.float64), torch.tensor(seconds, dtype=torch.float64)
    coef = torch.linalg.lstsq(a / y[:, None], torch.ones_like(y)).solution.tolist()  # relative errors
    ratios = ((a @ torch.tensor(coef, dtype=torch.float64)) / y).tolist()
    print(f"FLOAT64 {coef[0]:.2f}, SOMP_ELEMENT {coef[1]:.0f}, GRAM_ELEMENT {coef[2]:.0f}, SOMP_STEP_S {coef[3]:.1e} "
          f"(fit / measured over {len(y)} calls: {min(ratios):.2f} .. {max(ratios):.2f})")
    rate = cost.calibrate(shape, "cpu").host_flops
    heads, rank, n_cand = shape.n_layers * shape.n_heads, 4, 512
    unembed, m_all = torch.randn(shape.vocab, shape.d_model, generator=g), torch.randn(shape.d_model, heads * rank)
    took = timed(lambda: shortlist(unembed, torch.ones(shape.d_model), m_all, rank, n_cand))
    gemm = 2.0 * shape.vocab * shape.d_model * heads * rank
    kept = heads * (shape.vocab + -(-shape.vocab // cost.READOUT_CHUNK) * n_cand)
    print(f"TOPK_ELEMENT {(took * rate - gemm) / kept:.0f} (shortlist {took:.2f} s at {rate / 1e9:.0f} GFLOP/s)")
    print(f"load average after: {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama")
    parser.add_argument("--host-cost", action="store_true", help="phases measured beside workers/cost.py")
    parser.add_argument("--fit", action="store_true", help="fit workers/cost.py's host-price constants")
    parser.add_argument("--settings", type=int, default=12, help="head-scaling settings per concept")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--reference-heads", type=int, default=4)
    args = parser.parse_args()
    if args.fit:
        return fit()
    if args.host_cost:
        return host_cost(args.model)
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
