"""Pattern family throughput against a plain forward on the same batches, and build peak memory.

Prints ratios measured side by side in one run (these machines are shared and noisy):
  - patterns tokens/s divided by plain-forward tokens/s (target >= 0.5 on CPU);
  - the peak RSS of a whole `atlas build --families patterns` process over the model's weight bytes.

Usage: python bench/bench_patterns.py [--model llama] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from workers.families.patterns import PatternsFamily
from workers.models import load, resolve
from workers.probes import repeated_tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    lm = load(resolve(args.model), "cpu")
    family = PatternsFamily()
    config = family.config({})
    tokens = repeated_tokens(lm.tokenizer, lm.adapter.unembed.weight.shape[0], n=config["n"],
                             batch=config["batch"], seed=config["seed"])
    family.run(lm, config)  # warm up both paths once
    with torch.inference_mode():
        lm.model(tokens)
    ratios, plain_tps, pattern_tps = [], [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        t0 = time.perf_counter()
        with torch.inference_mode():
            lm.model(tokens)
        plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        family.run(lm, config)
        patterns = time.perf_counter() - t0
        plain_tps.append(tokens.numel() / plain)
        pattern_tps.append(tokens.numel() / patterns)
        ratios.append(plain / patterns)
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.duckdb"
        cmd = [sys.executable, "-m", "cli", "build", "--model", args.model, "--families", "patterns",
               "--db", str(db), "--executor", "local", "--json"]
        subprocess.run(cmd, check=True, capture_output=True)
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024

    result = {
        "model": lm.source.key,
        "tokens_per_batch": tokens.numel(),
        "plain_forward_tokens_per_s": round(statistics.median(plain_tps), 1),
        "patterns_tokens_per_s": round(statistics.median(pattern_tps), 1),
        "patterns_over_plain_ratio": round(statistics.median(ratios), 3),
        "ratio_target": ">= 0.5",
        "build_peak_rss_mb": round(peak_rss / 2**20, 1),
        "weights_mb": round(weight_bytes / 2**20, 1),
        "peak_rss_over_weights": round(peak_rss / weight_bytes, 2),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
