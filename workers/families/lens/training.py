"""Trained per-head lenses (Attention Lens, Sakarvadia et al., arXiv 2310.16270), in head space.

One map per head from z (d_head) to the vocabulary, A_h (vocab x d_head) plus a bias b_h (vocab):
a d_model -> vocab lens on the head's output W_O^h z is exactly such a map, n_heads times smaller
(reference note, section 3). A_h starts as the head's logit lens, s_bar * W_U diag(gamma) C W_O^h^T,
with s_bar the mean frozen final-norm scale over the training positions, and b_h = 0.

Loss: KL(P_model || softmax(A_h z + b_h)) per head, mean over heads and positions (each head's lens
is fitted on its own, unlike Attention Lens's sum over a layer's heads at the last position).
Documents are right-padded; only non-pad positions after BOS are ever sampled, so padding cannot
leak into the loss (Attention Lens reads position -1, which is padding for all but the longest row).
KL before (the logit-lens init) and after is measured on held-out documents, next to a
head-independent baseline: the mean model distribution over the training positions, which is
what the bias alone could learn. Lower KL is better (nats, >= 0).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from atlas.errors import BadInput
from workers.corpora import Corpus
from workers.families.lens import clean_run, frozen_scale, head_readout_matrix, norm_affine, readout_rows
from workers.models import LoadedModel
from workers.probes import bos_id

Progress = Callable[[str], None]
LENS_VERSION = 2  # 2: Gemma 2/3 lens inputs carry the post-attention norm's 1/rms (the init is the logit lens)


@dataclass
class LensData:
    """Cached clean-run activations at the non-pad positions of some documents."""

    z: dict[int, torch.Tensor]  # layer -> (N, n_heads, d_head)
    final: torch.Tensor  # (N, d_model) final-norm output, to recompute the model's logits
    scale: torch.Tensor  # (N,) frozen final-norm scale
    tokens: int = 0


def documents(corpus: Corpus, tokenizer: Any, window: int, n_docs: int, min_tokens: int = 8) -> list[list[int]]:
    """One token list per text, BOS first, truncated to `window`; texts shorter than min_tokens dropped."""
    bos = bos_id(tokenizer)
    docs = []
    for text in corpus.texts:
        ids = [bos, *tokenizer.encode(text, add_special_tokens=False)[: window - 1]]
        if len(ids) >= min_tokens:
            docs.append(ids)
        if len(docs) >= n_docs:
            break
    if len(docs) < 2:
        raise BadInput(f"the corpus {corpus.name} is too short for lens training: it has {len(docs)} texts of "
                       f"at least {min_tokens} tokens, and needs 2 (one to train, one held out)",
                       "pass a longer corpus (paragraphs separated by blank lines)")
    return docs


def pad_batch(docs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to (B, T) ids and a (B, T) attention mask (1 = real token)."""
    width = max(len(d) for d in docs)
    ids = torch.full((len(docs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.long)
    for row, doc in enumerate(docs):
        ids[row, : len(doc)] = torch.tensor(doc)
        mask[row, : len(doc)] = 1
    return ids, mask


def training_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) attention mask -> bool (B, T): real tokens after BOS; padding is never a target."""
    keep = mask.bool().clone()
    keep[:, 0] = False
    return keep


@torch.inference_mode()
def collect(lm: LoadedModel, docs: list[list[int]], layers: list[int], batch: int = 8) -> LensData:
    a = lm.adapter
    gamma, beta, centred = norm_affine(a)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else bos_id(lm.tokenizer)
    zs: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    finals, scales, n_tokens = [], [], 0
    for start in range(0, len(docs), batch):
        ids, mask = pad_batch(docs[start: start + batch], pad)
        keep = training_positions(mask)
        with clean_run(a) as run:
            lm.model(ids.to(lm.device), attention_mask=mask.to(lm.device))
        keep = keep.to(lm.device)
        for layer in layers:  # the head's real write is write_input(z) @ w_write: Gemma 2/3's 1/rms included
            zs[layer].append(a.write_input(layer, run["z"][layer].float())[keep].cpu())  # (n, H, K)
        finals.append(run["norm_out"][keep].float().cpu())
        scales.append(frozen_scale(run["norm_in"], run["norm_out"], gamma, beta, centred)[keep].cpu())
        n_tokens += int(mask.sum())
    return LensData({layer: torch.cat(v) for layer, v in zs.items()}, torch.cat(finals), torch.cat(scales),
                    n_tokens)


def model_logprobs(lm: LoadedModel, final: torch.Tensor) -> torch.Tensor:
    """(n, d_model) final-norm outputs -> (n, vocab) log-probs, fp32 (soft caps are ignored)."""
    w_u = lm.adapter.unembed.weight.detach().float()
    return F.log_softmax(final.to(w_u.device) @ w_u.T, dim=-1)


def lens_kl(target_logp: torch.Tensor, lens_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(P || Q) per head: target (n, V), lens logits (n, H, V), mask (n,) -> (H,), mean over kept n."""
    logq = F.log_softmax(lens_logits.float(), dim=-1)
    p = target_logp.exp()[:, None]
    kl = (p * (target_logp[:, None] - logq)).sum(-1)  # (n, H)
    if mask is not None:
        kl = kl[mask.bool()]
    return kl.mean(0)


class LayerLens(torch.nn.Module):
    """A (H, V, K) and b (H, V): one head-space lens per head of one layer."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(a)
        self.b = torch.nn.Parameter(b)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z (n, H, K) -> logits (n, H, V)."""
        return torch.einsum("nhk,hvk->nhv", z, self.a) + self.b


def logit_lens_init(lm: LoadedModel, layer: int, scale: float) -> LayerLens:
    a = lm.adapter
    gamma, _, centred = norm_affine(a)
    g = head_readout_matrix(a, layer, gamma, centred).cpu()  # (H, K, d_model)
    w_u = a.unembed.weight.detach().float().cpu()  # (V, d_model)
    weight = torch.einsum("hkd,vd->hvk", g, w_u) * scale  # (H, V, K)
    return LayerLens(weight.contiguous(), torch.zeros(a.n_heads, w_u.shape[0]))


@torch.no_grad()
def evaluate(lm: LoadedModel, lens: LayerLens, z: torch.Tensor, final: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Mean KL per head over all given positions: (H,)."""
    total = torch.zeros(z.shape[1])
    for start in range(0, z.shape[0], chunk):
        logp = model_logprobs(lm, final[start: start + chunk]).cpu()
        total += lens_kl(logp, lens(z[start: start + chunk])) * len(logp)
    return total / z.shape[0]


@torch.no_grad()
def mean_output_kl(lm: LoadedModel, train: LensData, held: LensData, chunk: int = 64) -> float:
    """KL of predicting the mean training distribution everywhere (what a bias alone can learn)."""
    mean_p = torch.zeros(lm.adapter.unembed.weight.shape[0])
    for start in range(0, len(train.final), chunk):
        mean_p += model_logprobs(lm, train.final[start: start + chunk]).exp().sum(0).cpu()
    logq = (mean_p / len(train.final)).clamp_min(1e-30).log()
    total = 0.0
    for start in range(0, len(held.final), chunk):
        logp = model_logprobs(lm, held.final[start: start + chunk]).cpu()
        total += float((logp.exp() * (logp - logq)).sum())
    return total / len(held.final)


@dataclass
class LayerResult:
    layer: int
    kl_before: list[float]
    kl_after: list[float]
    steps: int
    resumed_from: int
    seconds: float
    positions: int
    readout: list[dict[str, Any]] = field(default_factory=list)


def train_layer(lm: LoadedModel, layer: int, train: LensData, held: LensData, *, steps: int, lr: float,
                bias_lr: float, positions: int, seed: int, path: Path, save_every: int = 25,
                progress: Progress | None = None) -> LayerResult:
    """Train (or resume) one layer's lenses; checkpoints (weights, Adam state, step) go to `path`."""
    from safetensors.torch import load_file, save_file

    scale = float(train.scale.mean())
    lens = logit_lens_init(lm, layer, scale)
    z_held = held.z[layer]
    kl_before = evaluate(lm, lens, z_held, held.final)
    # the bias starts at 0 and must travel ~10 logits to the output prior: its own, larger step size
    opt = torch.optim.Adam([{"params": [lens.a], "lr": lr}, {"params": [lens.b], "lr": bias_lr}])
    start = 0
    if path.exists():
        saved = load_file(str(path))
        lens.a.data.copy_(saved["a"])
        lens.b.data.copy_(saved["b"])
        start = int(saved["step"].item())
        for name, param in (("a", lens.a), ("b", lens.b)):
            if f"exp_avg.{name}" in saved:
                opt.state[param] = {"step": torch.tensor(float(start)), "exp_avg": saved[f"exp_avg.{name}"],
                                    "exp_avg_sq": saved[f"exp_avg_sq.{name}"]}
    gen = torch.Generator().manual_seed(seed + layer)
    z_train = train.z[layer]
    for _ in range(start):  # replay the sampler so a resumed run sees the same positions
        torch.randint(len(z_train), (positions,), generator=gen)

    def checkpoint(step: int) -> None:
        tensors = {"a": lens.a.detach().contiguous(), "b": lens.b.detach().contiguous(),
                   "step": torch.tensor(step)}
        for name, param in (("a", lens.a), ("b", lens.b)):
            if param in opt.state:
                tensors[f"exp_avg.{name}"] = opt.state[param]["exp_avg"].contiguous()
                tensors[f"exp_avg_sq.{name}"] = opt.state[param]["exp_avg_sq"].contiguous()
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"layer": str(layer), "scale_init": str(scale)})
        tmp.replace(path)

    t0 = time.perf_counter()
    for step in range(start, steps):
        idx = torch.randint(len(z_train), (positions,), generator=gen)
        with torch.no_grad():
            logp = model_logprobs(lm, train.final[idx]).cpu()  # (n, V)
        loss = lens_kl(logp, lens(z_train[idx])).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % save_every == 0 or step + 1 == steps:
            checkpoint(step + 1)
            if progress:
                progress(f"layer {layer}: step {step + 1}/{steps}, train KL {loss.item():.3f}")
    seconds = time.perf_counter() - t0
    kl_after = evaluate(lm, lens, z_held, held.final)
    mean_z = z_train.mean(0)  # (H, K)
    with torch.no_grad():
        logits = torch.einsum("hk,hvk->hv", mean_z, lens.a)
        logits = logits - logits.mean(-1, keepdim=True)
    rows = readout_rows(layer, logits, lm.tokenizer, 50, ("lens",))
    return LayerResult(layer, kl_before.tolist(), kl_after.tolist(), steps, start, seconds,
                       (steps - start) * positions, rows)


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """'20,25,-1' -> [20, 25, n-1]; default: three layers spread over the second half."""
    if not spec:
        return sorted({n_layers // 2, (3 * n_layers) // 4, n_layers - 1})
    try:
        layers = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError as exc:
        raise BadInput(f"--layers '{spec}' is not a comma-separated list of integers", "e.g. --layers 20,25,29") \
            from exc
    out = sorted({x % n_layers if -n_layers <= x < 0 else x for x in layers})
    if not out or any(not 0 <= x < n_layers for x in out):
        raise BadInput(f"--layers {spec}: this model has layers 0..{n_layers - 1}", "e.g. --layers 20,25,29")
    return out


DEFAULTS: dict[str, Any] = {"steps": 100, "lr": 1e-3, "bias_lr": 0.1, "positions": 64, "docs": 40, "window": 64,
                            "seed": 0}


def train_lenses(model: str, db: str | Path, *, layers: str | None = None, steps: int = DEFAULTS["steps"],
                 corpus: str | None = None, text_field: str = "text", lr: float = DEFAULTS["lr"],
                 bias_lr: float = DEFAULTS["bias_lr"],
                 positions: int = DEFAULTS["positions"], docs: int = DEFAULTS["docs"],
                 window: int = DEFAULTS["window"], seed: int = DEFAULTS["seed"], device: str = "auto",
                 progress: Progress | None = None) -> dict[str, Any]:
    """`atlas lens train`: check inputs, train each layer (resuming), then record one run in the atlas.

    Everything that can be wrong with the input fails before the atlas or the lens files are touched.
    """
    from atlas.records import RunRecord
    from atlas.shards import write_shard
    from atlas.store import Atlas
    from workers.build import build_lock, shard_root
    from workers.corpora import load_corpus
    from workers.models import load, resolve
    from workers.plan import stable_hash

    say = progress or (lambda message: None)
    if steps < 1 or positions < 1 or docs < 2 or window < 8:
        raise BadInput("--steps and --positions must be >= 1, --docs >= 2, --window >= 8", "see --help")
    db = Path(db)
    source = resolve(model)
    text = load_corpus(corpus, text_field)
    lm = load(source, device)
    chosen = parse_layers(layers, lm.adapter.n_layers)
    all_docs = documents(text, lm.tokenizer, window, docs)
    held_out = set(range(0, len(all_docs), 5)) if len(all_docs) >= 5 else {len(all_docs) - 1}
    held_docs = [d for i, d in enumerate(all_docs) if i in held_out]
    train_docs = [d for i, d in enumerate(all_docs) if i not in held_out]
    config = {"corpus": corpus or "embedded", "corpus_id": text.corpus_id, "text_field": text_field,
              "layers": chosen, "lr": lr, "bias_lr": bias_lr, "positions_per_step": positions, "docs": len(all_docs),
              "window": window, "seed": seed, "held_out": "every 5th document (else the last)",
              "init": "logit lens s_bar * W_U diag(gamma) C W_O^h^T, bias 0",
              "loss": "KL(P_model || softmax(A_h z + b_h)) per head, non-pad positions after BOS",
              "optimizer": "Adam", "dtype": "float32",
              "version": LENS_VERSION, "head_input": "z as the head writes it (Gemma 2/3: x 1/rms of the post-norm)"}
    weights_hash = stable_hash([source.key, config])
    run_config = {**config, "steps": steps}
    run_id = "lens_trained-" + stable_hash([source.key, run_config])
    folder = db.with_name(db.stem + "_lenses") / f"{source.name.replace('/', '__')}-{weights_hash[:12]}"
    started = datetime.now(UTC)
    with build_lock(db):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"model_key": source.key, **config}, indent=1))
        say(f"collecting activations on {len(train_docs)} + {len(held_docs)} documents")
        train = collect(lm, train_docs, chosen)
        held = collect(lm, held_docs, chosen)
        baseline = mean_output_kl(lm, train, held)
        results = []
        for layer in chosen:
            say(f"layer {layer}: training {lm.adapter.n_heads} lenses")
            results.append(train_layer(lm, layer, train, held, steps=steps, lr=lr, bias_lr=bias_lr, positions=positions,
                                       seed=seed, path=folder / f"layer_{layer}.safetensors", progress=say))
        seconds = (datetime.now(UTC) - started).total_seconds()
        tables = _tables(results, baseline, folder)
        trained_positions = sum(r.positions for r in results)
        train_s = sum(r.seconds for r in results)
        run = RunRecord.ended(run_id=run_id, model_key=source.key, family="lens_trained",
                              family_version=LENS_VERSION,
                              probe_set=f"corpus:{text.corpus_id}:docs={len(all_docs)}:window={window}",
                              config={**run_config, "weights": str(folder), "held_out_positions": len(held.final),
                                      "train_positions": len(train.final)},
                              config_hash=stable_hash(run_config), device=lm.device,
                              tokens=train.tokens + held.tokens, seconds=seconds, started=started)
        tables["run_metrics"].append({"metric": "lens_trained.positions_per_s",
                                      "value": trained_positions / train_s if train_s else None,
                                      "detail": {"positions": trained_positions, "seconds": train_s}})
        shard = write_shard(shard_root(db), run, lm.models_row(), tables)
        with Atlas.writer(db) as atlas:
            atlas.ingest(shard)
    return {"run_id": run_id, "db": str(db), "weights": str(folder), "kl_mean_output_baseline": baseline,
            "layers": [{"layer": r.layer, "kl_before": sum(r.kl_before) / len(r.kl_before),
                        "kl_after": sum(r.kl_after) / len(r.kl_after), "steps": r.steps,
                        "resumed_from": r.resumed_from, "seconds": round(r.seconds, 2)} for r in results]}


def _tables(results: list[LayerResult], baseline: float, folder: Path) -> dict[str, list[dict[str, Any]]]:
    metrics, tokens, run_metrics = [], [], []
    for r in results:
        for head, (before, after) in enumerate(zip(r.kl_before, r.kl_after, strict=True)):
            metrics.append({"layer": r.layer, "head": head, "metric": "lens_trained.kl", "value": after,
                            "n": r.steps, "stderr": None})
            metrics.append({"layer": r.layer, "head": head, "metric": "lens_trained.kl_init", "value": before,
                            "n": 0, "stderr": None})
        tokens += r.readout
    all_before = [x for r in results for x in r.kl_before]
    all_after = [x for r in results for x in r.kl_after]
    per_layer = {str(r.layer): {"before": sum(r.kl_before) / len(r.kl_before),
                                "after": sum(r.kl_after) / len(r.kl_after)} for r in results}
    run_metrics.append({"metric": "lens_trained.kl_before", "value": sum(all_before) / len(all_before),
                        "detail": {"per_layer": {k: v["before"] for k, v in per_layer.items()}}})
    run_metrics.append({"metric": "lens_trained.kl_after", "value": sum(all_after) / len(all_after),
                        "detail": {"per_layer": {k: v["after"] for k, v in per_layer.items()},
                                   "weights": str(folder)}})
    run_metrics.append({"metric": "lens_trained.kl_mean_output_baseline", "value": baseline,
                        "detail": {"what": "KL to the mean training output distribution"}})
    return {"head_metrics": metrics, "head_tokens": tokens, "run_metrics": run_metrics}
