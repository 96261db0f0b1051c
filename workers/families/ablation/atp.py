"""Attribution patching (AtP, Nanda 2022), and AtP with the QK fix of AtP* (Kramar et al., arXiv 2403.00745).

AtP estimates the effect of replacing a node n's clean value by n' from one forward and one
backward on the clean input: c(n) ~ (n' - n) . dM/dn, for every node at once.

- Head output (`ablation.atp.<metric>`): n = the head's z (the o_proj input slice), n' = the same
  replacement the exact ablation uses (zero, mean or resample). It estimates exactly the quantity
  `ablation.<metric>` measures. Its errors are downstream nonlinearity: saturated softmaxes and
  cancelling direct/indirect paths give false negatives (the paper's section 3).
- Attention pattern (`ablation.atp_qk.<metric>`), the AtP* QK fix: patching a head's queries and
  keys moves its attention through a softmax, which a gradient linearizes badly when the softmax is
  saturated. Following the paper (eq. 7-10) we recompute the head's softmax exactly with the
  patched q and k, A' = softmax(q' k'^T * scale + mask), and use sum (A' - A) . dM/dA. Patched q/k:
  resample takes them from the counterpart; zero and mean set q to 0, so the head attends uniformly
  over the keys it may see (Wu et al.'s retrieval-head masking, arXiv 2404.15574). This estimates a
  different intervention from head-output ablation (the head keeps its values), so it is stored
  under its own metric id and not compared with the exact head-output effects.

To read q, k and A with gradients, the forward runs through a registered eager attention function
(`atlas_tap`) that records them; it computes what the model's own eager attention computes
(scores, optional soft-cap, additive mask, float32 softmax), so the forward's numbers are the same
to float rounding.

What this is not (issue 14 item 8; hence the name "AtP with the QK fix", not "AtP*"): AtP* as
published also applies GradDrop (one backward per layer with that layer's residual gradient dropped,
against cancellation) and treats each key and each query as its own node. Here the node is one query
head: its q and its own copy of k are patched together in one recomputed softmax, and under GQA the
k patched is that query head's view of the shared KV head (the other query heads of the group keep
the clean k), which no real KV-head patch does. GradDrop would cost one backward per layer per
metric group (30 on SmolLM2, against one now); it is not implemented, and `ablation.atp` carries the
cancellation false negatives the paper describes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from workers.families.ablation.exact import Probe, needs_counterpart
from workers.models import LoadedModel

TAP = "atlas_tap"


@dataclass
class Tap:
    """What the tapped attention saw, per layer in call order; optional exact q/k patches."""

    records: list[dict[str, torch.Tensor]] = field(default_factory=list)
    patch: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]] = field(default_factory=dict)


_ACTIVE: list[Tap] = []


def _tap_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None,
                   dropout: float = 0.0, softcap: float | None = None,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention. query (B, H, T, d); key/value (B, H_kv, S, d) -> out (B, T, H, d), probs."""
    tap = _ACTIVE[-1]
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)  # (B, H, S, d): query head h reads KV head h // groups
    v = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = len(tap.records)
    q = query
    if layer in tap.patch:
        heads, q_new, k_new = tap.patch[layer]
        q, k = q.clone(), k.clone()
        q[:, heads], k[:, heads] = q_new[:, heads].to(q.dtype), k_new[:, heads].to(k.dtype)
    t, s = q.shape[-2], k.shape[-2]
    if attention_mask is None:  # plain causal
        attention_mask = torch.full((t, s), float("-inf"), device=q.device).triu(s - t + 1)[None, None]
    mask = attention_mask[..., :s]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, device=q.device).masked_fill(~mask, float("-inf"))
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax((scores + mask).float(), dim=-1).to(q.dtype)
    tap.records.append({"q": q, "k": k, "probs": probs, "mask": mask.detach(),
                        "scale": torch.tensor(scale), "softcap": torch.tensor(softcap or 0.0)})
    return (probs @ v).transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(TAP, _tap_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(TAP, eager_mask)


@contextmanager
def tapped(lm: LoadedModel, tap: Tap) -> Iterator[Tap]:
    """Run the model's attention through the recording eager function."""
    _register()
    previous = lm.model.config._attn_implementation
    lm.model.set_attn_implementation(TAP)
    _ACTIVE.append(tap)
    try:
        yield tap
    finally:
        _ACTIVE.pop()
        lm.model.set_attn_implementation(previous)


def patterns(record: dict[str, torch.Tensor], q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The exact softmax with patched q, k (B, H, T|S, d) -> (B, H, T, S), as the tap computes it."""
    scores = q @ k.transpose(-1, -2) * float(record["scale"])
    cap = float(record["softcap"])
    if cap:
        scores = torch.tanh(scores / cap) * cap
    return torch.softmax((scores + record["mask"]).float(), dim=-1)


@dataclass
class AtPResult:
    z: dict[str, torch.Tensor]  # {metric: (L, H, n)} head-output estimates per sequence the metric reads
    qk: dict[str, torch.Tensor]  # {metric: (L, H, B)} QK-fixed attention-pattern estimates
    qk_linear: dict[str, torch.Tensor]  # {metric: (L, H, B)} the same without the fix (dq.g + dk.g)


def _qk_targets(mode: str, records: list[dict], counter: list[dict] | None, layer: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Patched q, k for every head of one layer: (B, H, T, d) each."""
    rec = records[layer]
    if mode == "resample":
        if counter is not None:
            return counter[layer]["q"], counter[layer]["k"]
        return rec["q"].detach().roll(1, dims=0), rec["k"].detach().roll(1, dims=0)
    return torch.zeros_like(rec["q"]), rec["k"].detach()  # q <- 0: uniform attention


def atp_effects(lm: LoadedModel, probe: Probe, reps_fn: Any, mode: str) -> AtPResult:
    """One forward + one backward per metric on the clean probe; all heads' estimates.

    reps_fn(z: list[(B, T, H, d)], counter_z) -> the replacement z per layer (as exact ablation).
    """
    a = lm.adapter
    counter_records, counter_z = None, None
    if needs_counterpart(mode, probe):
        assert probe.counterpart is not None
        ctap = Tap()
        zc: dict[int, torch.Tensor] = {}
        hooks = [a.out_proj(i).register_forward_pre_hook(
            lambda m, args, _i=i: zc.__setitem__(_i, a.split_heads(args[0]).detach().clone()))
            for i in range(a.n_layers)]
        try:
            with torch.inference_mode(), tapped(lm, ctap):
                lm.model(probe.counterpart.to(lm.device), logits_to_keep=1, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        counter_records = [{k: v.detach() for k, v in r.items()} for r in ctap.records]
        counter_z = [zc[i] for i in range(a.n_layers)]

    zs: dict[int, torch.Tensor] = {}
    embed = lm.model.get_input_embeddings()
    hooks = [embed.register_forward_hook(lambda m, i, out: out.detach().requires_grad_(True))]
    hooks += [a.out_proj(i).register_forward_pre_hook(lambda m, args, _i=i: zs.__setitem__(_i, args[0]))
              for i in range(a.n_layers)]
    tap = Tap()
    try:
        with torch.enable_grad(), tapped(lm, tap):
            metrics = probe.metrics(probe.logits(lm))
    finally:
        for h in hooks:
            h.remove()
    z = [a.split_heads(zs[i].detach()) for i in range(a.n_layers)]  # (B, T, H, d)
    reps = reps_fn(z, counter_z)
    targets = [_qk_targets(mode, tap.records, counter_records, layer) for layer in range(a.n_layers)]
    out = AtPResult({}, {}, {})
    n_l = a.n_layers
    moved = [patterns(tap.records[layer], targets[layer][0].float(), targets[layer][1].float())
             - tap.records[layer]["probs"].detach().float() for layer in range(n_l)]  # (B, H, T, S): A' - A
    groups = _backward_groups(probe, list(metrics))
    for n, group in enumerate(groups):
        inputs = ([zs[i] for i in range(n_l)] + [r["probs"] for r in tap.records]
                  + [r["q"] for r in tap.records] + [r["k"] for r in tap.records])
        total = torch.stack([metrics[name].sum() for name in group]).sum()
        grads = torch.autograd.grad(total, inputs, retain_graph=n < len(groups) - 1, allow_unused=True)
        gz, ga, gq, gk = grads[:n_l], grads[n_l:2 * n_l], grads[2 * n_l:3 * n_l], grads[3 * n_l:]
        est_z, est_qk, est_lin = [], [], []
        for layer in range(n_l):
            g = a.split_heads(gz[layer]).float()  # (B, T, H, d)
            est_z.append(((reps[layer].float() - z[layer].float()) * g).sum((1, 3)).T)  # (H, B)
            rec = tap.records[layer]
            q_new, k_new = targets[layer]
            est_qk.append((moved[layer] * ga[layer].float()).nan_to_num().sum((2, 3)).T)
            lin = ((q_new - rec["q"].detach()) * gq[layer]).sum((2, 3))
            lin = lin + ((k_new - rec["k"].detach()) * gk[layer]).sum((2, 3))
            est_lin.append(lin.float().T)
        stacked = (torch.stack(est_z).cpu(), torch.stack(est_qk).cpu(), torch.stack(est_lin).cpu())
        for name in group:  # each metric's own rows: the other metrics of the group have no gradient there
            rows = probe.rows_of(name)
            out.z[name], out.qk[name], out.qk_linear[name] = (x[..., rows] for x in stacked)
    return out


def _backward_groups(probe: Probe, names: list[str]) -> list[list[str]]:
    """Metrics whose rows are disjoint share one backward pass (rows never interact in a forward, so
    the gradient of their sum holds each metric's own gradient on its own rows); others get one each."""
    groups: list[tuple[list[str], set[int]]] = []
    for name in names:
        rows = set(probe.rows_of(name).tolist())
        home = next((g for g in groups if name in probe.rows and not (g[1] & rows)), None)
        if home is None or any(other not in probe.rows for other in home[0]):
            groups.append(([name], rows))
        else:
            home[0].append(name)
            home[1].update(rows)
    return [group for group, _ in groups]


def exact_pattern_effects(lm: LoadedModel, probe: Probe, mode: str, heads: list[tuple[int, int]]
                          ) -> dict[str, torch.Tensor]:
    """The intervention atp_qk estimates, done for real: one forward per head with its q, k patched.

    Returns {metric: (len(heads), B)} per-sequence effects.
    """
    clean_tap = Tap()
    with torch.inference_mode(), tapped(lm, clean_tap):
        clean = probe.metrics(probe.logits(lm).cpu())
    counter = None
    if mode == "resample" and probe.counterpart is not None:
        ctap = Tap()
        with torch.inference_mode(), tapped(lm, ctap):
            lm.model(probe.counterpart.to(lm.device), logits_to_keep=1, use_cache=False)
        counter = ctap.records
    out: dict[str, list[torch.Tensor]] = {name: [] for name in clean}
    for layer, head in heads:
        q_new, k_new = _qk_targets(mode, clean_tap.records, counter, layer)
        tap = Tap(patch={layer: ([head], q_new, k_new)})
        with torch.inference_mode(), tapped(lm, tap):
            got = probe.metrics(probe.logits(lm).cpu())
        for name, value in got.items():
            out[name].append(value - clean[name])
    return {name: torch.stack(values) for name, values in out.items()}
