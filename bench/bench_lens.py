"""Lens family throughput over a plain forward on the same batches, measured side by side.

    .venv/bin/python bench/bench_lens.py [--model llama] [--windows 8] [--window 128] [--repeats 2]

Prints tokens/s of a plain forward, of the lens reduction (forward + head-space reduction), their
ratio (target >= 0.7), and lens-training positions/s for one layer.
"""

from __future__ import annotations

import argparse
import time

import torch

from workers.corpora import load_corpus, token_windows
from workers.families.lens import LensStats
from workers.families.lens.training import collect, documents, train_layer
from workers.models import load, resolve
from workers.probes import bos_id


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=5)
    args = parser.parse_args()
    lm = load(resolve(args.model), "auto")
    tokens = token_windows(load_corpus(None), lm.tokenizer, args.window, args.windows, bos=bos_id(lm.tokenizer))
    plain_s = lens_s = 0.0
    with torch.inference_mode():
        lm.model(tokens[:1].to(lm.device))  # warm-up
    for _ in range(args.repeats):  # interleaved, so load drifts hit both alike
        for batch in tokens.split(args.batch):
            t0 = time.perf_counter()
            with torch.inference_mode():
                lm.model(batch.to(lm.device))
            plain_s += time.perf_counter() - t0
            stats = LensStats(lm.adapter)
            t0 = time.perf_counter()
            stats.add(lm, batch)
            lens_s += time.perf_counter() - t0
    n = tokens.numel() * args.repeats
    print(f"plain forward: {n / plain_s:.0f} tok/s; lens family: {n / lens_s:.0f} tok/s; "
          f"ratio {plain_s / lens_s:.2f} ({n} tokens, {lm.device})")
    docs = documents(load_corpus(None), lm.tokenizer, 64, 10)
    layer = lm.adapter.n_layers - 1
    train, held = collect(lm, docs[2:], [layer]), collect(lm, docs[:2], [layer])
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        result = train_layer(lm, layer, train, held, steps=args.train_steps, lr=1e-3, bias_lr=0.1, positions=64,
                             seed=0, path=Path(tmp) / "lens.safetensors")
    print(f"lens training, layer {layer} ({lm.adapter.n_heads} heads): "
          f"{result.positions / result.seconds:.0f} positions/s")


if __name__ == "__main__":
    main()
