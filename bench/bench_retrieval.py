"""Retrieval probe cost: peak memory and time per needle test, probe path vs full attention weights.

One needle test = prefill the prompt, then --steps greedy decode steps with a per-head argmax at
each step. Two ways, each at every length, each in a fresh subprocess (so the peak is its own):

- probe: sdpa prefill, then q_len = 1 decode steps through workers/families/retrieval/decode_probe.py (q.K^T row);
- full:  eager attention with output_attentions=True over the whole prompt (the T x T matrices
         of every layer and head), then decode steps with output_attentions.

Peak memory is the peak above the memory in use just before the test (CUDA: max allocated; CPU:
the subprocess's RSS sampled every 2 ms during the test, minus its RSS before the test; the
process-lifetime ru_maxrss would include the model load's own peak). A `full` run whose attention weights
alone would need more than --max-full-gb is not started; its projected size is printed instead.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_retrieval.py --lengths 1024,2048,4096,8192
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def one(model: str, mode: str, length: int, steps: int, device: str) -> dict:
    """Run one test in this process; returns seconds and peak bytes above the pre-test level."""
    import threading

    import psutil
    import torch
    from transformers import DynamicCache

    from workers.corpora import load_corpus
    from workers.families.retrieval.decode_probe import DecodeProbe, attached
    from workers.families.retrieval.needles import NEEDLES, build_tests
    from workers.models import load, resolve

    lm = load(resolve(model), device)
    test = build_tests(lm.tokenizer, load_corpus(None).texts, [length], [50.0], NEEDLES[:1], chat=True)[0]
    ids = torch.tensor([test.ids], device=lm.device)
    cuda = lm.device == "cuda"
    n_layers = lm.adapter.n_layers
    with torch.inference_mode():  # page the (memory-mapped) weights in before measuring
        lm.model(ids[:, :16])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    proc, peak_rss, running = psutil.Process(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak_rss[0] = max(peak_rss[0], proc.memory_info().rss)
            time.sleep(0.002)

    base = torch.cuda.memory_allocated() if cuda else proc.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with torch.inference_mode():
        cache = DynamicCache(config=lm.model.config)
        if mode == "probe":
            with attached(lm.model, DecodeProbe(record=True)) as probe:
                lm.model(ids[:, :-1], past_key_values=cache, logits_to_keep=1)
                current = ids[:, -1:]
                for step in range(steps):
                    logits = lm.model(current, past_key_values=cache).logits
                    probe.absolute(n_layers, ids.shape[1] + step)
                    current = logits[:, -1:].argmax(-1)
        else:
            previous = lm.model.config._attn_implementation
            lm.model.set_attn_implementation("eager")
            out = lm.model(ids[:, :-1], past_key_values=cache, output_attentions=True, logits_to_keep=1)
            _ = [a[0, :, -1].argmax(-1) for a in out.attentions]  # (heads,) per layer
            del out
            current = ids[:, -1:]
            for _ in range(steps):
                out = lm.model(current, past_key_values=cache, output_attentions=True)
                _ = [a[0, :, -1].argmax(-1) for a in out.attentions]
                current = out.logits[:, -1:].argmax(-1)
            lm.model.set_attn_implementation(previous)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    running[0] = False
    sampler.join()
    peak = torch.cuda.max_memory_allocated() - base if cuda else peak_rss[0] - base
    return {"mode": mode, "length": length, "seconds": seconds, "peak_bytes": peak}


def projected_full_bytes(model: str, length: int) -> int:
    """Bytes of the prefill's attention weights alone: layers x heads x T^2 x 4 (float32 on CPU)."""
    import json as _json
    from pathlib import Path

    from workers.models import _dequantized_dir, resolve

    cfg = _json.loads((Path(_dequantized_dir(resolve(model))) / "config.json").read_text())
    return cfg["num_hidden_layers"] * cfg["num_attention_heads"] * length * length * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per test")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-full-gb", type=float, default=4.0,
                        help="skip full-weights runs whose T x T weights alone exceed this")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # mode:length, run in a subprocess
    args = parser.parse_args()
    if args.one:
        mode, length = args.one.split(":")
        print(json.dumps(one(args.model, mode, int(length), args.steps, args.device)))
        return
    print(f"{'length':>7} {'probe s':>9} {'probe MiB':>10} {'full s':>9} {'full MiB':>10} "
          f"{'mem ratio':>9} {'time ratio':>10}")
    for length in (int(x) for x in args.lengths.split(",")):
        row = {}
        for mode in ("probe", "full"):
            if mode == "full" and projected_full_bytes(args.model, length) > args.max_full_gb * 2**30:
                row[mode] = {"seconds": float("nan"), "peak_bytes": projected_full_bytes(args.model, length),
                             "skipped": True}
                continue
            cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                   "--device", args.device, "--one", f"{mode}:{length}"]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        p, f = row["probe"], row["full"]
        full_mib = f"{f['peak_bytes'] / 2**20:9.0f}" + ("*" if f.get("skipped") else " ")
        print(f"{length:>7} {p['seconds']:>9.1f} {p['peak_bytes'] / 2**20:>10.0f} {f['seconds']:>9.1f} "
              f"{full_mib:>10} {f['peak_bytes'] / max(p['peak_bytes'], 1):>9.1f} "
              f"{f['seconds'] / p['seconds']:>10.2f}", flush=True)
    print("* not run: projected size of the prefill attention weights alone (--max-full-gb)")


if __name__ == "__main__":
    main()
