"""Benchmark: exact all-heads ablation (fast path) vs the naive loop, and AtP, side by side.

Prints, per probe set, costs in forward-pass equivalents (seconds / seconds of one plain clean
forward on the same batch, measured in this run): the fast exact path for every head, the naive
loop (one full forward per head; measured on --naive-layers evenly spaced layers and scaled to
all heads, since every naive forward costs the same), AtP (one forward + one backward, plus the
counterpart forward for resample), the largest difference between fast and naive effects, and
AtP's Spearman correlation and top-10 overlap with the exact effects.

    .venv/bin/python bench/bench_ablation.py --model llama --ablation mean
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workers.families.ablation import AblationFamily, spearman, top_overlap
from workers.families.ablation.atp import atp_effects
from workers.families.ablation.exact import clean_run, counterpart_z, exact_effects, naive_effects, replacements
from workers.models import load, resolve


def _forward_seconds(lm, probe, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            probe.logits(lm)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flop_model(lm, probe) -> tuple[float, float, float]:
    """Multiply-adds from parameter counts (attention scores ignored): (fast, naive, AtP) in forward
    equivalents. fast = clean forward + per head layers l..L-1 and the kept unembedding rows."""
    a = lm.adapter
    b, t = probe.tokens.shape
    layer = [sum(p.numel() for p in block.parameters()) * b * t for block in a.blocks]
    head = a.unembed.weight.numel() * b * probe.n_positions
    full = sum(layer) + head
    fast = full + sum(a.n_heads * (sum(layer[i:]) + head) for i in range(a.n_layers))
    return fast / full, a.n_layers * a.n_heads, 3.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--ablation", default="mean", choices=("zero", "mean", "resample"))
    parser.add_argument("--naive-layers", type=int, default=4, help="layers the naive loop runs (0 = all)")
    parser.add_argument("--probes", default="corpus,induction,ioi", help="comma list, or add concepts")
    parser.add_argument("--size", default="", help="family size options, e.g. ablation_windows=1,ablation_window=32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(resolve(args.model), "cpu")
    sizes = {k: int(v) for k, v in (item.split("=") for item in args.size.split(",") if item)}
    family = AblationFamily()
    probes, _ = family.probes(lm, family.config({"ablation": args.ablation, **sizes}))
    a = lm.adapter
    layers = list(range(a.n_layers))
    if args.naive_layers:
        step = a.n_layers / args.naive_layers
        layers = sorted({int(i * step) for i in range(args.naive_layers)} | {a.n_layers - 1})
    print(f"model {lm.source.key}  {a.n_layers} layers x {a.n_heads} heads  ablation={args.ablation}  "
          f"threads={torch.get_num_threads()}", flush=True)
    for probe in probes:
        if probe.name not in args.probes.split(","):
            continue
        fwd = _forward_seconds(lm, probe)
        t0 = time.perf_counter()
        cache = clean_run(lm, probe)
        counter = (counterpart_z(lm, probe) if args.ablation == "resample" and probe.counterpart is not None
                   else None)
        reps = replacements(args.ablation, probe, cache.z, counter)
        fast = exact_effects(lm, probe, cache, reps)
        t_fast = time.perf_counter() - t0
        heads = [(layer, head) for layer in layers for head in range(a.n_heads)]
        t0 = time.perf_counter()
        slow = naive_effects(lm, probe, cache, reps, heads)
        t_naive = (time.perf_counter() - t0) * (a.n_layers * a.n_heads) / len(heads)
        t0 = time.perf_counter()
        est = atp_effects(lm, probe, lambda z, c, _p=probe: replacements(args.ablation, _p, z, c), args.ablation)
        t_atp = time.perf_counter() - t0
        shape = tuple(probe.tokens.shape)
        print(f"\n[{probe.name}] batch {shape[0]} x {shape[1]} tokens, {probe.n_positions} logit positions per row; "
              f"one clean forward {fwd * 1000:.0f} ms", flush=True)
        print(f"  exact fast path, all {a.n_layers * a.n_heads} heads: {t_fast / fwd:7.1f} forward equivalents")
        print(f"  naive loop (1 full forward/head, {len(heads)} heads timed, scaled): "
              f"{t_naive / fwd:7.1f} forward equivalents -> fast path {t_naive / t_fast:.2f}x cheaper")
        f_fast, f_naive, _ = flop_model(lm, probe)
        print(f"  FLOP model: fast {f_fast:.1f}, naive {f_naive:.0f} forward equivalents -> "
              f"{f_naive / f_fast:.2f}x")
        print(f"  AtP (forward + backward, all heads, all metrics): {t_atp / fwd:7.2f} forward equivalents")
        for name in fast:
            rows = torch.tensor(layers)
            diff = (fast[name][rows] - slow[name][rows]).abs().max().item()
            truth, guess = fast[name].mean(-1), est.z[name].mean(-1)
            print(f"  {name:24s} max |fast - naive| = {diff:.2e}   AtP vs exact: Spearman "
                  f"{spearman(truth, guess):+.3f}, top-10 overlap {top_overlap(truth, guess)}/10", flush=True)


if __name__ == "__main__":
    main()
