"""Check: does keeping the full KV cache for the retrieval heads (atlas export --format duoattention) keep
needle accuracy, against the same budget spent on random KV heads?

Conditions, each decoding every needle prompt greedily as its own batch row (workers/kv_budget.py):
`full` (every KV head keeps its cache), `retrieval` (the labelled heads full, the rest sink + recent),
`random_i` (as many KV heads, drawn uniformly at random, seed i), `none` (every head streaming).
Needle tests are the retrieval family's (three built-in needles, the embedded corpus, chat prompt).
Prints one JSON document: per condition the mean ROUGE-1 recall and the share of tests answered
(recall > 0.5), per needle depth, with the sample sizes and the load average.

    .venv/bin/python bench/bench_kv_budget.py --db atlas.duckdb --model llama --budget 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import numpy as np
import torch

from atlas.export import kv_head_labels
from atlas.store import Atlas
from workers.corpora import EMBEDDED, load_corpus
from workers.families.retrieval.needles import NEEDLES, build_tests, depth_grid
from workers.kv_budget import needle_recalls
from workers.models import load, resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="atlas.duckdb", help="an atlas with retrieval.score for --model")
    parser.add_argument("--model", default="llama")
    parser.add_argument("--budget", type=float, default=0.25, help="share of KV heads kept full")
    parser.add_argument("--aggregate", default="max", choices=("max", "mean"))
    parser.add_argument("--sink", type=int, default=64)
    parser.add_argument("--recent", type=int, default=256)
    parser.add_argument("--length", type=int, default=1024, help="prompt length in tokens")
    parser.add_argument("--depths", type=int, default=5, help="needle depths (0..100%%) per needle")
    parser.add_argument("--draws", type=int, default=3, help="random head sets")
    parser.add_argument("--max-new", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); on a busy "
                        "CPU one thread was faster (22 s vs 50 s for one 4 x 512 prefill at load average 12)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with Atlas(args.db, read_only=True) as atlas:
        labels = kv_head_labels(atlas, args.model, args.budget, aggregate=args.aggregate)
    shape = (labels["n_layers"], labels["n_kv_heads"])
    chosen = torch.zeros(shape, dtype=torch.bool)
    for entry in labels["kv_heads"]:
        chosen[entry["layer"], entry["kv_head"]] = entry["full"]
    n_full = int(chosen.sum())
    choices = {"full": torch.ones(shape, dtype=torch.bool), "retrieval": chosen}
    for draw in range(args.draws):
        pick = random.Random(args.seed + draw).sample(range(chosen.numel()), n_full)
        mask = torch.zeros(chosen.numel(), dtype=torch.bool)
        mask[pick] = True
        choices[f"random_{draw}"] = mask.reshape(shape)
    choices["none"] = torch.zeros(shape, dtype=torch.bool)

    lm = load(resolve(args.model), "cpu")
    corpus = load_corpus(EMBEDDED, "text")
    tests = build_tests(lm.tokenizer, corpus.texts, [args.length], depth_grid(args.depths), NEEDLES, chat=True)
    t0 = time.perf_counter()
    recalls = needle_recalls(lm, tests, choices, args.sink, args.recent, args.max_new)
    seconds = time.perf_counter() - t0

    def summary(values: list[float]) -> dict[str, float]:
        answered = float(np.mean(np.array(values) > 0.5))
        return {"recall": round(float(np.mean(values)), 4), "answered": round(answered, 4)}

    depths = sorted({t.depth for t in tests})
    report = {
        "model": labels["model_key"], "budget": args.budget, "full_kv_heads": n_full,
        "kv_heads": chosen.numel(), "aggregate": args.aggregate, "sink": args.sink, "recent": args.recent,
        "length": args.length, "tests": len(tests), "needles": len(NEEDLES), "depths": depths,
        "draws": args.draws, "max_new": args.max_new,
        "conditions": {name: summary(values) for name, values in recalls.items()},
        "random_mean": summary([r for name, v in recalls.items() if name.startswith("random") for r in v]),
        "per_depth": {name: {str(d): round(float(np.mean([r for r, t in zip(v, tests, strict=True)
                                                          if t.depth == d])), 3) for d in depths}
                      for name, v in recalls.items()},
        "needle_outside_window": sum(1 for t in tests if t.span[0] >= args.sink
                                     and len(t.ids) - t.span[1] >= args.recent),
        "seconds": round(seconds, 1), "load_average": [round(x, 2) for x in os.getloadavg()],
        "retrieval_heads_full": [[e["layer"], e["kv_head"]] for e in labels["kv_heads"] if e["full"]],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
