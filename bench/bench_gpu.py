"""Every family on 7-9B (and 70B) model shapes, with no download: random bf16 weights from the real configs.

    python bench/bench_gpu.py                                  # on a GPU: the four 8B-class configs, every family
    python bench/bench_gpu.py --configs llama-3.3-70b          # 70B: 2 of its 80 blocks, extrapolated
    python bench/bench_gpu.py --configs llama-3.2-1b --layers 2 --device cpu   # the CPU check of the memory model
    python bench/bench_gpu.py --validate llama --families patterns,lens       # predicted vs measured, a real model

Throughput does not depend on the weights' values, so random weights time the real work: each family runs
through the local executor (workers/executors.InProcessExecutor, the `--executor local` path) at the
minibatch workers/batching.py picks. Printed per family: tokens/s over a plain forward's tokens/s on
batches of the family's own sequence length; peak memory over the weights' bytes (CUDA's allocator peak,
or the process's RSS growth on a CPU); and the full atlas's time for the whole model, extrapolated from
the measured seconds by the cost model's ratio (workers/cost.py: the work at the model's full depth and
the chosen sizes over the work just measured), at default probe sizes and at paper-grade ones (Wu et al.:
600 needle tests up to the model's context; HeadVis: 16,384 sequences of 512 tokens for patterns).

The tokenizer is a byte-level BPE trained in a second on the embedded corpus (any text encodes; the
needle prompts are measured in tokens either way); its ids fit every config's vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The real configs' sizes (config.json of each repo, the fields that shape the compute).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": False},
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 131072,
                   "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                   "use_sliding_window": False},
    "gemma-2-9b": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
                   "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
                   "max_position_embeddings": 8192, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                   "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256, "tie_word_embeddings": True},
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768,
                   "max_position_embeddings": 32768, "sliding_window": None, "rope_theta": 1000000.0,
                   "tie_word_embeddings": False},
    "llama-3.3-70b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
                      "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                      "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
                      "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": False},
    "llama-3.2-1b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                     "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True},
    # for the CPU test: Llama's layout at toy sizes
    "tiny": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "vocab_size": 4096, "max_position_embeddings": 2048, "tie_word_embeddings": False},
}
EIGHT_B = ["llama-3.1-8b", "qwen2.5-7b", "gemma-2-9b", "mistral-7b"]
PAPER_GRADE = {"patterns": {"probe_batch": 16384, "probe_n": 255},  # HeadVis: 16,384 x 512 tokens
               "retrieval": {"retrieval_lengths": 20, "retrieval_depths": 10, "retrieval_min_length": 1000}}
FAMILIES = ("patterns", "lens", "ablation", "pursuit", "retrieval", "circuits", "examples")


def bench_tokenizer(vocab: int = 8000) -> Any:
    """A byte-level BPE trained on the embedded corpus, with BOS/EOS/pad and a newline (retrieval stops on it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from workers.corpora import load_corpus

    texts = load_corpus(None, "text").texts
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")


def random_model(name: str, layers: int | None, device: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """A random-weight model of the named config (its first `layers` blocks), built on the device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(CONFIGS[name])
    if layers:
        raw["num_hidden_layers"] = min(layers, raw["num_hidden_layers"])
    fields = {k: v for k, v in raw.items() if k not in ("architectures", "model_type")}
    config = AutoConfig.for_model(raw["model_type"], **fields, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.architectures = raw["architectures"]
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), raw


class PeakMemory:
    """Peak bytes during a block: CUDA's allocator peak, or the process RSS sampled every 20 ms on a CPU;
    `extra` is the growth over what was held when the block started (the weights, on a loaded model)."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self.start, self._stop = device, 0, 0, threading.Event()

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.start)

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            import psutil

            proc = psutil.Process()
            self.peak = self.start = proc.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(0.02):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def plain_tokens_per_second(lm: Any, length: int, batch: int, repeats: int = 2) -> float:
    """A plain forward's throughput on (batch, length) random ids (logits of the last position only)."""
    import torch

    ids = torch.randint(3, 1000, (batch, length), device=lm.device)
    with torch.inference_mode():
        lm.model(ids[:1, : min(length, 8)], logits_to_keep=1, use_cache=False)  # warm up
        best = math.inf
        for _ in range(repeats):
            if lm.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            lm.model(ids, logits_to_keep=1, use_cache=False)
            if lm.device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
    return batch * length / best


def family_length(family: str, config: dict[str, Any]) -> int:
    """The sequence length a family's forwards mostly run at (for the plain-forward baseline)."""
    return {"patterns": 1 + 2 * config.get("n", 50), "lens": config.get("window", 128),
            "ablation": config.get("window", 64), "pursuit": 16,
            "retrieval": config.get("max_context", 1024), "examples": config.get("window", 64)}.get(family, 128)


def run_families(lm: Any, families: list[str], options: dict[str, Any], dtype: str) -> list[dict[str, Any]]:
    """Each family as one unit through the local executor; seconds, tokens, peak bytes, ok/error."""
    from workers.executors import InProcessExecutor
    from workers.plan import plan

    executor = InProcessExecutor(lm.device)
    executor.loaded[lm.source.key] = lm  # the random model stands in for a loaded checkpoint
    out = []
    with tempfile.TemporaryDirectory() as shards:
        for unit in plan([lm.source], families, options, dtype):
            with PeakMemory(lm.device) as peak:
                result = next(iter(executor.run([unit], Path(shards))))
            out.append({"family": unit.family, "config": unit.config, "ok": result.ok, "seconds": result.seconds,
                        "tokens": result.tokens, "extra_bytes": peak.extra, "error": result.error})
            state = "ok" if result.ok else "FAILED"
            print(f"# {unit.family}: {state} in {result.seconds:.1f} s, {result.tokens} tokens"
                  f" (load average {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    return out


def extrapolate(measured: float, bench_shape: Any, full_shape: Any, family: str, bench_config: dict[str, Any],
                full_config: dict[str, Any], profile: Any, devices: int) -> float:
    """Measured seconds x (cost of the full job / cost of what ran), both priced on one profile."""
    from workers.cost import estimate

    ran = estimate(bench_shape, family, bench_config, profile, 1).seconds
    full = estimate(full_shape, family, full_config, profile, devices).seconds
    return measured * full / max(ran, 1e-9)


def family_configs(families: list[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from workers.families import get_family
    from workers.options import validate

    chosen = [get_family(f) for f in families]
    valid = validate(chosen, options)
    return {f.name: f.config(valid) for f in chosen}


def bench_config(name: str, args: argparse.Namespace, families: list[str], options: dict[str, Any]) -> list[dict]:
    import torch

    from workers.adapters import adapter_for
    from workers.batching import Shape
    from workers.cost import calibrate, estimate
    from workers.models import LoadedModel, ModelSource

    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") or args.bf16 else torch.float32
    dtype_name = str(dtype).removeprefix("torch.")
    layers = args.layers or (2 if name == "llama-3.3-70b" else None)
    t0 = time.perf_counter()
    model, raw = random_model(name, layers, device, dtype)
    built = time.perf_counter() - t0
    cls = raw["architectures"][0]
    source = ModelSource(spec=name, name=f"random-{name}", format="random", path="", revision=f"L{layers or 'all'}",
                         architecture=cls)
    spec = adapter_for(cls)
    assert spec is not None, cls
    lm = LoadedModel(source, model, bench_tokenizer(min(8000, raw["vocab_size"])), spec.bind(model), device,
                     dtype_name)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bench_shape, full_shape = Shape.from_config(model.config), Shape.from_config(CONFIGS[name])
    profile = calibrate(bench_shape, device)
    full_weights = full_shape.params * (2 if dtype_name == "bfloat16" else 4)
    devices = max(1, math.ceil(full_weights / (0.85 * profile.memory))) if device.startswith("cuda") else 1
    configs_default = family_configs(families, options)
    configs_paper = family_configs(families, {**options, **{k: v for f in families for k, v in
                                                              PAPER_GRADE.get(f, {}).items()},
                                              "max_context": full_shape.context})
    rows = []
    for r in run_families(lm, families, options, dtype_name):
        family, config = r["family"], r["config"]
        length = family_length(family, config)
        tps = r["tokens"] / r["seconds"] if r["seconds"] else 0.0
        # circuits reads weights only: no tokens, so no forward to compare with
        plain = plain_tokens_per_second(lm, min(length, 2048), 4 if device == "cpu" else 8) if tps else 0.0
        full_default = extrapolate(r["seconds"], bench_shape, full_shape, family, config,
                                   {**configs_default[family], "dtype": dtype_name}, profile, devices)
        full_paper = extrapolate(r["seconds"], bench_shape, full_shape, family, config,
                                 {**configs_paper[family], "dtype": dtype_name}, profile, devices)
        predicted = estimate(bench_shape, family, config, profile).seconds
        rows.append({"config": name, "layers": bench_shape.n_layers, "of": full_shape.n_layers, "device": device,
                     "dtype": dtype_name, "family": family, "ok": r["ok"], "seconds": round(r["seconds"], 2),
                     "predicted_s": round(predicted, 2), "tokens": r["tokens"], "tokens_per_s": round(tps, 1),
                     "vs_plain_forward": round(tps / plain, 3) if plain else None,
                     "peak_over_weights": round((weights + r["extra_bytes"]) / weights, 2),
                     "activation_gb": round(r["extra_bytes"] / 1e9, 3),
                     "predicted_activation_gb": round(estimate(bench_shape, family, config, profile).work
                                                      .activation_bytes / 1e9, 3),
                     "full_atlas_default_s": round(full_default, 4), "full_atlas_paper_s": round(full_paper, 4),
                     "devices_for_full_model": devices, "error": (r["error"] or "").split("\n")[0][:200]})
    print(f"# {name}: {bench_shape.n_layers}/{full_shape.n_layers} blocks, {weights / 1e9:.2f} GB of weights "
          f"({dtype_name}), built in {built:.1f} s; {profile.source}", file=sys.stderr)
    return rows


def validate_model(spec: str, args: argparse.Namespace, families: list[str], options: dict[str, Any]) -> list[dict]:
    """Predicted (cost model on this machine, calibrated now) vs measured seconds for a real model."""
    from workers.batching import Shape
    from workers.cost import calibrate, estimate
    from workers.families import get_family
    from workers.models import load, resolve

    lm = load(resolve(spec), args.device)
    shape = Shape.from_config(lm.model.config)
    rows = []
    for family in families:  # calibrated again before each family: a shared host's load drifts
        profile = calibrate(shape, lm.device)
        picked = {k: v for k, v in options.items() if k in {o.name for o in get_family(family).options}}
        for r in run_families(lm, [family], picked, lm.dtype):
            predicted = estimate(shape, r["family"], r["config"], profile).seconds
            rows.append({"model": spec, "family": r["family"], "ok": r["ok"], "measured_s": round(r["seconds"], 2),
                         "predicted_s": round(predicted, 2), "ratio": round(predicted / r["seconds"], 2),
                         "tokens": r["tokens"], "load_average": round(os.getloadavg()[0], 1),
                         "profile": profile.source})
            print("\t".join(str(v) for v in rows[-1].values()), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(EIGHT_B), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--validate", help="a real model (alias, directory): predicted vs measured per family")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--layers", type=int, help="blocks to build (the rest extrapolated); default all (70B: 2)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--bf16", action="store_true", help="bf16 weights on a CPU too")
    parser.add_argument("-o", "--option", action="append", default=[], help="family option KEY=VALUE (JSON value)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options: dict[str, Any] = {}
    for pair in args.option:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    families = list(FAMILIES) if args.families == "all" else [f.strip() for f in args.families.split(",") if f.strip()]
    rows: list[dict[str, Any]] = []
    if args.validate:
        rows = validate_model(args.validate, args, families, options)
    else:
        for name in [c.strip() for c in args.configs.split(",") if c.strip()]:
            if name not in CONFIGS:
                parser.error(f"unknown config {name}; known: {', '.join(CONFIGS)}")
            rows += bench_config(name, args, families, options)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    if rows:
        keys = list(rows[0])
        print("\t".join(keys))
        for row in rows:
            print("\t".join(str(row[k]) for k in keys))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return rows


if __name__ == "__main__":
    main()
