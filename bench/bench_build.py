"""Benchmark: the default build, family by family, over its compute floor, measured in one run.

For each family at its default options (the units `atlas build --model llama` runs) it counts what
the model computed: block-tokens (tokens through one decoder block; a resumed forward that skips
layers counts only the blocks it ran) and unembedding rows (positions whose logits were computed).
The compute floor is the wall time plain forwards need for the same work, measured here side by
side: block-tokens / L at a plain forward's tokens/s (logits at one position), plus unembedding rows
at the unembedding's rows/s. wall / floor says how much a family spends beyond its arithmetic
(Python per decode step, small batches, hooks, SOMP on the CPU, ...).

    .venv/bin/python bench/bench_build.py --model llama [--families all] [--cli]

--cli also times the real command (`atlas build` on Ray, then `atlas roles`) in a fresh atlas.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from workers.families import FAMILIES
from workers.models import LoadedModel, load, resolve
from workers.options import validate


class Counter:
    """Block-tokens and unembedding rows computed while attached."""

    def __init__(self) -> None:
        self.block_tokens = 0
        self.unembed_rows = 0
        self.forwards = 0


@contextmanager
def counting(lm: LoadedModel):
    counter = Counter()

    def block(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        counter.block_tokens += hidden.shape[0] * hidden.shape[1]

    def unembed(module, args, output):
        counter.unembed_rows += args[0].shape[:-1].numel()
        counter.forwards += 1

    handles = [b.register_forward_hook(block, with_kwargs=True) for b in lm.adapter.blocks]
    handles.append(lm.model.get_output_embeddings().register_forward_hook(unembed))
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def plain_rates(lm: LoadedModel, repeats: int = 3) -> tuple[float, float]:
    """(tokens/s of a plain forward with logits at one position, unembedding rows/s)."""
    tokens = torch.randint(3, lm.adapter.unembed.weight.shape[0], (8, 128), generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1024, lm.adapter.d_model)
    head = lm.model.get_output_embeddings()
    body, rows = [], []
    with torch.inference_mode():
        lm.model(tokens, logits_to_keep=1)
        for _ in range(repeats):
            t0 = time.perf_counter()
            lm.model(tokens, logits_to_keep=1)
            body.append(tokens.numel() / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            head(hidden)
            rows.append(len(hidden) / (time.perf_counter() - t0))
    return statistics.median(body), statistics.median(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--families", default="all")
    parser.add_argument("-o", "--option", action="append", default=[], help="family option KEY=VALUE (JSON value)")
    parser.add_argument("--cli", action="store_true", help="also time `atlas build` + `atlas roles` end to end")
    args = parser.parse_args()
    names = list(FAMILIES) if args.families == "all" else args.families.split(",")
    given = {k: json.loads(v) if v[:1] in "[{0123456789-" else v for k, _, v in (o.partition("=") for o in args.option)}
    print(f"load average before: {os.getloadavg()}", flush=True)
    lm = load(resolve(args.model), "cpu")
    n_layers = lm.adapter.n_layers
    rows = []
    for name in names:
        family = FAMILIES[name]
        config = family.config(validate([family], given))
        tps, rps = plain_rates(lm)  # measured next to each family: the machine's load drifts
        with counting(lm) as counter:
            t0 = time.perf_counter()
            family.run(lm, {**config, "dtype": "float32"})
            wall = time.perf_counter() - t0
        floor = counter.block_tokens / n_layers / tps + counter.unembed_rows / rps
        rows.append((name, wall, counter.block_tokens / n_layers, counter.unembed_rows, counter.forwards, floor))
        print(f"{name:10s} wall {wall:7.1f} s | {counter.block_tokens / n_layers:9.0f} full-forward tokens, "
              f"{counter.unembed_rows:8d} logit rows, {counter.forwards:5d} forwards | floor {floor:6.1f} s "
              f"(plain {tps:.0f} tok/s, unembed {rps:.0f} rows/s) | wall / floor {wall / floor:5.2f}", flush=True)
    wall = sum(r[1] for r in rows)
    floor = sum(r[5] for r in rows)
    print(f"{'all':10s} wall {wall:7.1f} s | floor {floor:6.1f} s | wall / floor {wall / floor:5.2f}")
    if args.cli:
        with tempfile.TemporaryDirectory() as tmp:
            atlas = str(Path(sys.executable).parent / "atlas")
            db = str(Path(tmp) / "a.duckdb")
            t0 = time.perf_counter()
            subprocess.run([atlas, "build", "--model", args.model, "--families", ",".join(names), "--db", db],
                           check=True, capture_output=True)
            subprocess.run([atlas, "roles", "--model", args.model, "--db", db], check=True, capture_output=True)
            end_to_end = time.perf_counter() - t0
        print(f"atlas build + roles (Ray, fresh atlas): {end_to_end:.1f} s; over the families' floor "
              f"{end_to_end / floor:.2f}; over their in-process wall {end_to_end / wall:.2f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
