"""Benchmark: the circuits family's time and memory on growing random Llama configs, extrapolated to 70B.

Each size runs in its own process (so its peak RSS is its own): a random-weight LlamaForCausalLM built
from a config (MLP width 64: the family never reads the MLPs), then CircuitsFamily.run twice, without
and with composition. Prints per size the seconds of each phase, peak RSS, and the multiply-adds the
cost model gives, then the rates (multiply-adds per second, measured on the largest size) applied to
Llama-3.3-70B's config.

Cost model (multiply-adds): W_U^T W_E: vocab d^2; copying per layer: n_kv d^2 d_head + n_heads d_head^2 d
(+ eigenvalues, n_heads d_head^3); composition: 3 kinds x layers (layers - 1) / 2 layer pairs x
(n_heads d_head)^2 d. Memory beyond the weights: W_U^T W_E (d^2 fp64) and the stored writers,
layers n_heads d_head d fp32.

    .venv/bin/python bench/bench_circuits.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

SIZES = [  # d_model, layers, heads, kv heads, vocab
    (256, 8, 4, 2, 8192), (512, 8, 8, 2, 16384), (1024, 8, 16, 4, 32768), (2048, 8, 32, 8, 32768)]
LLAMA_70B = (8192, 80, 64, 8, 128256)  # Llama-3.3-70B-Instruct's config: hidden, layers, heads, KV heads, vocab


def macs(d: int, layers: int, heads: int, kv: int, vocab: int) -> dict[str, float]:
    dh = d // heads
    return {"copying": vocab * d * d + layers * (kv * d * d * dh + heads * dh * dh * d + heads * dh ** 3),
            "composition": 3 * layers * (layers - 1) / 2 * (heads * dh) ** 2 * d}


def extra_bytes(d: int, layers: int, heads: int, kv: int, vocab: int) -> float:
    return d * d * 8 + layers * heads * (d // heads) * d * 4


def one(size: tuple[int, ...]) -> dict[str, float]:
    import torch
    import transformers as tf

    from workers.adapters import ADAPTERS
    from workers.families.circuits import CircuitsFamily

    d, layers, heads, kv, vocab = size
    config = tf.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    lm = SimpleNamespace(model=model, adapter=ADAPTERS["LlamaForCausalLM"].bind(model))
    family = CircuitsFamily()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    family.run(lm, family.config({"circuits_composition": False}))  # type: ignore[arg-type]
    copying = time.perf_counter() - t0
    t0 = time.perf_counter()
    family.run(lm, family.config({}))  # type: ignore[arg-type]
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"copying_s": copying, "composition_s": max(total - copying, 1e-9), "total_s": total,
            "rss_before_mb": before, "rss_peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="internal: run one size d,layers,heads,kv,vocab and print JSON")
    parser.add_argument("--sizes", type=int, default=len(SIZES), help="how many of the sizes to run")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(tuple(int(x) for x in args.one.split(",")))))
        return
    rows = []
    for size in SIZES[:args.sizes]:
        out = subprocess.run([sys.executable, __file__, "--one", ",".join(map(str, size))], capture_output=True,
                             text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        cost = macs(*size)
        rows.append({"size": size, **{k: round(v, 2) for k, v in measured.items()},
                     "copying_gmac": round(cost["copying"] / 1e9, 2),
                     "composition_gmac": round(cost["composition"] / 1e9, 2),
                     "model_extra_mb": round(extra_bytes(*size) / 2**20, 1)})
        print(json.dumps(rows[-1]), flush=True)
    last = rows[-1]
    copy_rate = last["copying_gmac"] / last["copying_s"]
    comp_rate = last["composition_gmac"] / last["composition_s"]
    cost = macs(*LLAMA_70B)
    print(json.dumps({
        "rates_gmac_per_s": {"copying": round(copy_rate, 2), "composition": round(comp_rate, 2)},
        "llama_3.3_70b": {"copying_gmac": round(cost["copying"] / 1e9),
                          "composition_gmac": round(cost["composition"] / 1e9),
                          "copying_s_at_measured_rate": round(cost["copying"] / 1e9 / copy_rate),
                          "composition_s_at_measured_rate": round(cost["composition"] / 1e9 / comp_rate),
                          "extra_memory_gb": round(extra_bytes(*LLAMA_70B) / 2**30, 1),
                          "weights_bf16_gb": 141},
        "load_average": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
