"""Ablation: the causal effect of removing each head, exact and by attribution patching.

Per head, `ablation.<metric>` = metric(head ablated) - metric(clean), the mean over the probe
set's sequences (stderr over sequences); the head's z (o_proj input) is replaced by zero, its mean,
or its value on a counterpart sequence (`--ablation`, see workers/families/ablation/exact.py). Metrics:

- `loss`: next-token cross-entropy (nats) on windows of the corpus. Effect > 0: the head helps
  predict text. Unbounded; typical effects are 1e-3 .. 1e-1 nats.
- `induction_loss`: cross-entropy on the repeated half of BOS + X + X (random X, Olsson et al.
  2022). Effect > 0: the head serves in-context copying (induction and previous-token heads).
- `ioi_logit_diff`: logit(IO) - logit(S) on the built-in IOI prompts (workers/families/ablation/ioi.py; Wang et al.,
  arXiv 2211.00593). Effect < 0: the head helps pick the indirect object (name movers); > 0:
  it works against it (negative name movers). Backup heads can hide a head's effect.
- `concept.<name>`: probability mass of a concept's single-token words after the concept's own
  prompts (workers/concepts.py, Head Pursuit arXiv 2510.21518). Effect < 0: the head promotes it.

`ablation.atp.<metric>` is the AtP estimate of the same effect, `ablation.atp_qk.<metric>` AtP with
the QK fix (AtP*'s softmax recomputation, without its GradDrop and with a query head's q and its view
of k patched together: not AtP* as published) for patching the head's attention pattern only (see
workers/families/ablation/atp.py). With
method both, run_metrics holds per metric the Spearman correlation of AtP with exact effects over
all heads (`ablation.agreement.spearman.<metric>`) and the overlap of their top-10 heads by
|effect| (`ablation.agreement.top10.<metric>`, 0..10).

Failure cases: zero ablation takes activations off-distribution (IOI calls it noisy); mean effects
on a few short windows are noisy for small heads (see the stderr); AtP misses saturated and
cancelling effects (false negatives), so confirm its top heads with the exact path.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from workers.families.ablation.exact import (
    MODES,
    Probe,
    clean_run,
    counterpart_z,
    exact_effects,
    float32_model,
    heads_per_forward,
    mean_kind,
    needs_counterpart,
    noop_check_layers,
    noop_deviation,
    noop_holds,
    noop_tolerance,
    replacements,
)
from workers.families.base import FamilyResult, head_metric_rows, scaled_batch
from workers.models import LoadedModel
from workers.options import CONCEPTS, CORPUS, SEED, TEXT_FIELD, Option, resolve
from workers.probes import bos_id, repeated_tokens

METHODS = ("exact", "atp", "both")


# -- probe sets ----------------------------------------------------------------------------------
def corpus_probe(lm: LoadedModel, config: dict[str, Any]) -> Probe:
    from workers.corpora import load_corpus, token_windows

    corpus = load_corpus(config["corpus"], config["text_field"])
    tokens = token_windows(corpus, lm.tokenizer, config["window"], config["windows"], bos_id(lm.tokenizer))

    def metrics(logits: torch.Tensor) -> dict[str, torch.Tensor]:  # (B, T-1, V)
        target = tokens[:, 1:].to(logits.device)
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
        return {"loss": ce.view(target.shape).mean(1)}

    t = tokens.shape[1]
    return Probe("corpus", tokens, torch.arange(t - 1), metrics, torch.ones_like(tokens, dtype=torch.bool))


def induction_probe(lm: LoadedModel, config: dict[str, Any]) -> Probe:
    n = config["induction_n"]
    tokens = repeated_tokens(lm.tokenizer, lm.adapter.unembed.weight.shape[0], n=n,
                             batch=config["induction_batch"], seed=config["seed"])

    def metrics(logits: torch.Tensor) -> dict[str, torch.Tensor]:  # (B, n-1, V) at n+1 .. 2n-1
        target = tokens[:, n + 2: 2 * n + 1].to(logits.device)
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
        return {"induction_loss": ce.view(target.shape).mean(1)}

    return Probe("induction", tokens, torch.arange(n + 1, 2 * n), metrics,
                 torch.ones_like(tokens, dtype=torch.bool), aligned=True)  # BOS + X + X: aligned slots


def _last_token_probe(name: str, tokens: torch.Tensor, last: torch.Tensor, valid: torch.Tensor,
                      per_row: Any, counterpart: torch.Tensor | None = None,
                      rows: dict[str, torch.Tensor] | None = None, aligned: bool = False) -> Probe:
    """Right-padded prompts whose metrics read each prompt's last real position (only that one
    position per row goes through the unembedding)."""

    def metrics(logits: torch.Tensor) -> dict[str, torch.Tensor]:  # (N, 1, V)
        return per_row(logits[:, 0])  # (N, V) -> {name: (n_i,)}

    return Probe(name, tokens, last, metrics, valid, counterpart, rows or {}, per_row=True, aligned=aligned)


def ioi_probe(lm: LoadedModel, config: dict[str, Any]) -> tuple[Probe, dict[str, Any]]:
    from workers.families.ablation.ioi import ioi_prompts, logit_diff

    s = ioi_prompts(lm.tokenizer, lm.adapter.unembed.weight.shape[0], config["ioi_prompts"], config["seed"])
    probe = _last_token_probe("ioi", s.tokens, s.last, s.valid,
                              lambda lg: {"ioi_logit_diff": logit_diff(lg, s.io.to(lg.device),
                                                                       s.s.to(lg.device))},
                              s.corrupted, aligned=True)  # each position one slot of its template, ABC alike
    return probe, s.provenance


def concept_probe(lm: LoadedModel, config: dict[str, Any]) -> tuple[Probe | None, dict[str, Any]]:
    from workers.concepts import concept_mass, load_concepts, tokenize_concept

    bos = bos_id(lm.tokenizer)
    n_vocab = lm.adapter.unembed.weight.shape[0]
    rows: list[list[int]] = []
    owner: list[str] = []
    ids: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {}
    for concept in load_concepts(config["concepts"]):
        toks = tokenize_concept(concept, lm.tokenizer, n_vocab)
        info[concept.name] = toks.summary()
        if not toks.ids:
            continue
        ids[concept.name] = torch.tensor(toks.ids)
        for prompt in concept.prompts[: config["concept_prompts"]]:
            rows.append([bos, *lm.tokenizer.encode(prompt, add_special_tokens=False)])
            owner.append(concept.name)
    if not rows:  # no concept has a single-token word in this tokenizer
        return None, info
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), bos, dtype=torch.long)
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], valid[i, : len(r)] = torch.tensor(r), True
    groups = {name: torch.tensor([i for i, o in enumerate(owner) if o == name]) for name in ids}

    def per_row(logits: torch.Tensor) -> dict[str, torch.Tensor]:  # (N, V)
        return {f"concept.{name}": concept_mass(logits[groups[name].to(logits.device)], ids[name])
                for name in ids}

    row_groups = {f"concept.{name}": group for name, group in groups.items()}
    return _last_token_probe("concepts", tokens, valid.sum(1) - 1, valid, per_row, rows=row_groups), info


# -- agreement -----------------------------------------------------------------------------------
def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two flat tensors (ties broken by order)."""
    rx = x.flatten().double().argsort().argsort().double()
    ry = y.flatten().double().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def top_overlap(x: torch.Tensor, y: torch.Tensor, k: int = 10) -> int:
    """Heads in both top-k lists by |effect| (k at most the number of heads)."""
    k = min(k, x.numel())
    tx = set(x.flatten().abs().topk(k).indices.tolist())
    return len(tx & set(y.flatten().abs().topk(k).indices.tolist()))


def _summary(per_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(L, H, B) per-sequence values -> mean, stderr (None for one sequence), n."""
    n = per_seq.shape[-1]
    stderr = per_seq.std(-1) / n**0.5 if n > 1 else None
    return per_seq.mean(-1), stderr, n


class AblationFamily:
    name = "ablation"
    version = 4  # 2: concept effects over each concept's own prompts (n, stderr); AtP concept estimates undiluted;
    # 3: mean ablation per position on the template probes (induction, IOI over its ABC prompts);
    # 4: the no-op check, a probe that fails it in bfloat16 measured in float32; atp_qk named AtP + QK fix

    stores = ("head_metrics", "run_metrics")

    options = (
        Option("ablation", "str", "mean",
               "what replaces a head's z: zero, mean (per position on the template probes), global_mean, resample",
               choices=MODES),
        Option("method", "str", "both", "exact ablation, attribution patching, or both (with their agreement)",
               choices=METHODS),
        Option("ablation_window", "int", 64, "tokens per corpus window (loss effect)", min=4, max=131072),
        Option("ablation_windows", "int", 2, "corpus windows (loss effect)", min=1, max=100_000),
        Option("ablation_induction_n", "int", 20, "|X| of the BOS + X + X induction probe", min=2, max=4096),
        Option("ablation_induction_batch", "int", 4, "induction probe sequences", min=1, max=4096),
        Option("ablation_ioi_prompts", "int", 12, "IOI prompts (logit-difference effect)", min=1, max=100_000),
        Option("concept_prompts", "int", 2, "prompts per concept (concept-mass effect)", min=1, max=1000),
        SEED, CORPUS, TEXT_FIELD, CONCEPTS,
    )

    # how the metrics are defined: stored with every run (runs.config.definitions), not hashed into its id
    definitions: ClassVar[dict[str, str]] = {
        "node": "z (o_proj input), per head",
        "mean": ("template probes (induction, IOI): per position, over the reference distribution (IOI's ABC "
                 "prompts); corpus windows and concept prompts: over real tokens at positions >= 1; "
                 "position 0 keeps its clean value"),
        "global_mean": "over real tokens at positions >= 1 on every probe; position 0 keeps its clean value",
        "resample": "corpus/induction: the previous sequence of the batch; ioi: ABC counterpart",
        "atp_qk": ("AtP with the QK fix of AtP* (the head's softmax recomputed with patched q, k; no GradDrop); "
                   "the node is one query head: its q and its own copy of the shared KV head's k are patched "
                   "together (not a KV-head patch under GQA); resample: counterpart q/k, zero/mean: q <- 0 "
                   "(uniform attention)"),
        "noop_check": ("replacement = z at the first and last layer must move every metric by at most 1e-4 + "
                       "1e-5 x max|clean| (ablation.noop.<metric>); a probe that fails in the model's dtype "
                       "(bfloat16) is measured with the model in float32 (exact_precision)"),
    }

    def config(self, options: dict[str, Any]) -> dict[str, Any]:
        from workers.corpora import load_corpus

        o = resolve(self.options, options)
        mode, method = o["ablation"], o["method"]
        config = {
            "ablation": mode, "method": method, "seed": o["seed"],
            "corpus": o["corpus"], "text_field": o["text_field"],
            "corpus_id": load_corpus(o["corpus"], o["text_field"]).corpus_id,
            "window": o["ablation_window"],
            "windows": o["ablation_windows"],
            "induction_n": o["ablation_induction_n"],
            "induction_batch": o["ablation_induction_batch"],
            "ioi_prompts": o["ablation_ioi_prompts"],
            "concepts": o["concepts"], "concept_prompts": o["concept_prompts"],
        }
        try:
            import workers.concepts as concepts_mod

            config["concept_hashes"] = {c.name: c.content_hash for c in concepts_mod.load_concepts(config["concepts"])}
        except ImportError:  # no concepts module: the concept metrics are left out
            config["concept_hashes"] = None
        return config

    def probe_set(self, config: dict[str, Any]) -> str:
        return (f"{config['corpus_id']}:w={config['window']}x{config['windows']}"
                f"+repeated:n={config['induction_n']}x{config['induction_batch']}"
                f"+ioi:{config['ioi_prompts']}+concepts:seed={config['seed']}")

    def probes(self, lm: LoadedModel, config: dict[str, Any]) -> tuple[list[Probe], dict[str, Any]]:
        probes = [corpus_probe(lm, config), induction_probe(lm, config)]
        ioi, ioi_info = ioi_probe(lm, config)
        probes.append(ioi)
        extra = {"ioi": ioi_info}
        if config.get("concept_hashes"):
            concepts, info = concept_probe(lm, config)
            extra["concepts_tokenized"] = info
            if concepts is not None:
                probes.append(concepts)
        return probes, extra

    @staticmethod
    def _exact(lm: LoadedModel, probe: Probe, mode: str,
               config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], str]:
        """Exact effects of one probe, after the no-op check (exact.py): where z replaced by itself
        moves a metric by more than the tolerance in the model's dtype (bfloat16), the probe is
        measured again with the model in float32. Returns the effects, the check's run_metrics rows
        and the dtype the effects were measured in. Heads per stacked forward: what the free memory
        holds once the clean cache is in it, halved on each retry of the unit (`scaled_batch`)."""
        dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
        cache = clean_run(lm, probe)
        chunk = scaled_batch(config, heads_per_forward(lm, probe))
        deviation = noop_deviation(lm, probe, cache, chunk)
        measured_in, after = dtype, None
        if noop_holds(deviation, cache):
            counter = counterpart_z(lm, probe) if needs_counterpart(mode, probe) else None
            exact = exact_effects(lm, probe, cache, replacements(mode, probe, cache.z, counter), heads_per_pass=chunk)
        else:
            with float32_model(lm):
                cache = clean_run(lm, probe)
                chunk = scaled_batch(config, heads_per_forward(lm, probe))
                after = noop_deviation(lm, probe, cache, chunk)
                counter = counterpart_z(lm, probe) if needs_counterpart(mode, probe) else None
                exact = exact_effects(lm, probe, cache, replacements(mode, probe, cache.z, counter),
                                      heads_per_pass=chunk)
            measured_in = "float32"
        rows = [{"metric": f"ablation.noop.{name}", "value": value,
                 "detail": {"dtype": dtype, "tolerance": noop_tolerance(cache, name), "exact_in": measured_in,
                            "layers": noop_check_layers(lm.adapter.n_layers),
                            **({"float32": after[name]} if after is not None else {})}}
                for name, value in deviation.items()]
        return exact, rows, measured_in

    def run(self, lm: LoadedModel, config: dict[str, Any]) -> FamilyResult:
        from workers.families.ablation.atp import atp_effects

        mode, method = config["ablation"], config["method"]
        probes, extra = self.probes(lm, config)
        rows: list[dict[str, Any]] = []
        run_rows: list[dict[str, Any]] = []
        tokens = 0
        seconds: dict[str, float] = {}
        precision: dict[str, str] = {}
        for probe in probes:
            tokens += probe.tokens.numel()
            exact: dict[str, torch.Tensor] = {}
            if method in ("exact", "both"):
                t0 = time.perf_counter()
                exact, noop_rows, precision[probe.name] = self._exact(lm, probe, mode, config)
                run_rows += noop_rows
                seconds[f"exact.{probe.name}"] = time.perf_counter() - t0
                for name, per_seq in exact.items():
                    mean, stderr, n = _summary(per_seq)
                    rows += head_metric_rows(f"ablation.{name}", mean, stderr, n)
            if method in ("atp", "both"):
                t0 = time.perf_counter()
                est = atp_effects(lm, probe, lambda z, c, _p=probe: replacements(mode, _p, z, c), mode)
                seconds[f"atp.{probe.name}"] = time.perf_counter() - t0
                for name in est.z:
                    for kind, values in (("atp", est.z[name]), ("atp_qk", est.qk[name])):
                        mean, stderr, n = _summary(values)
                        rows += head_metric_rows(f"ablation.{kind}.{name}", mean, stderr, n)
                    if name in exact:
                        truth, guess = exact[name].mean(-1), est.z[name].mean(-1)
                        detail = {"heads": truth.numel(), "mode": mode, "estimate": "ablation.atp"}
                        rho = spearman(truth, guess)  # undefined (NaN) when either side is constant
                        run_rows.append({"metric": f"ablation.agreement.spearman.{name}",
                                         "value": rho if math.isfinite(rho) else None, "detail": detail})
                        run_rows.append({"metric": f"ablation.agreement.top10.{name}",
                                         "value": float(top_overlap(truth, guess)), "detail": detail})
        extra["seconds"] = seconds
        if precision:  # the dtype each probe's exact effects were measured in (see the no-op check)
            extra["exact_precision"] = precision
        if mode in ("mean", "global_mean"):  # which mean each probe's metrics were measured against
            extra["mean_ablation"] = {probe.name: mean_kind(mode, probe) for probe in probes}
        if not config.get("concept_hashes"):
            extra["concepts_left_out"] = "workers.concepts is not available"
        return FamilyResult({"head_metrics": rows, "run_metrics": run_rows}, tokens=tokens, extra_config=extra)
