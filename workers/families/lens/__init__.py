"""Lens readouts: what each head writes, read through the final norm and the unembedding.

Direct logit attribution (DLA) of head h at position p to token v (logit lens per head,
Elhage et al. 2021; nostalgebraist 2020; the readout Attention Lens, arXiv 2310.16270, starts from):

    dla[p, h, v] = s_p * (W_U diag(gamma) C W_O^h z[p, h])[v]

- z[p, h] (d_head) is the head's input to the output projection; W_O^h its d_head x d_model slice.
- The final norm is linearised with the *frozen per-position scale* of the clean run: for RMSNorm
  y = s_p * gamma * x (C = identity); for LayerNorm y = s_p * gamma * (x - mean x) + beta (C
  centres). s_p is read off the clean run's norm input and output (least squares, exact for both
  norm kinds), so the attribution is the head's first-order direct effect with everything else
  held at the clean run; the norm's dependence on the head (through s_p) is ignored.
- The unembedding bias, and Gemma-2's final-logit soft cap, are not head contributions and are left out.

Stored per head, averaged over corpus positions 1 .. T-2 of each window (position 0 is BOS, whose
residual is atypical; every kept position has a known next token):

- head_tokens kind `promote` / `suppress`: the top / bottom `top_k` tokens of the mean DLA vector,
  centred over the vocabulary (a softmax ignores a shift shared by all tokens). Computed in head
  space: mean_p(s_p z[p, h]) is reduced first, then projected once, so no per-position d_model or
  vocab-sized tensors exist. Range: logits, higher = pushed more.
- `lens.direct_effect`: mean over positions of dla[p, h, next token], in logits (unbounded; > 0
  = the head writes towards the token that actually comes next). stderr over windows, n = windows.
- `lens.direct_effect_centered`: the same minus the head's mean DLA over the vocabulary, i.e. the
  part of the effect that changes the next token's probability and not every logit alike.

Failure cases: a mean over positions hides heads that write different things in different
contexts (they average out and show frequent-token or bias-like readouts); heads whose work is
indirect (feeding later layers: induction's previous-token partners, attention sinks) show small
direct effects although their ablation matters; with few windows the token lists are noisy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from atlas.errors import BadInput
from workers.adapters import BoundAdapter, norm_gain
from workers.batching import lens_batch
from workers.corpora import EMBEDDED, WINDOWS_DEFINITION, load_corpus, token_windows
from workers.families.base import FamilyResult, head_metric_rows, scaled_batch
from workers.hooks import capture_z
from workers.models import LoadedModel
from workers.options import CORPUS, TEXT_FIELD, Option, resolve
from workers.probes import bos_id

DEFAULTS = {"window": 128, "windows": 24, "batch": 8, "top_k": 50}


# -- the final norm, linearised at the clean run --------------------------------------------
def norm_affine(adapter: BoundAdapter) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(gamma (d_model,), beta (d_model,), centre) of the final norm, read from the module itself.

    LayerNorm centres and has weight/bias; every RMSNorm variant (Llama's gamma, Gemma's 1 + w)
    is y = s * gamma * x with gamma read off the module by `norm_gain`.
    """
    norm = adapter.final_norm
    param = next(norm.parameters())
    d = adapter.d_model
    if isinstance(norm, torch.nn.LayerNorm):
        gamma = norm.weight.detach() if norm.weight is not None else torch.ones(d, device=param.device)
        beta = norm.bias.detach() if norm.bias is not None else torch.zeros(d, device=param.device)
        return gamma.float(), beta.float(), True
    return norm_gain(norm, d).to(param.device), torch.zeros(d, device=param.device), False


def centre(x: torch.Tensor, on: bool) -> torch.Tensor:
    """C x: subtract the mean over the last (d_model) axis when the norm is a LayerNorm."""
    return x - x.mean(-1, keepdim=True) if on else x


def frozen_scale(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                 centred: bool) -> torch.Tensor:
    """Per-position scale s with y = s * gamma * C x + beta. x, y: (..., d_model) -> s: (...)."""
    g = gamma * centre(x.float(), centred)
    return ((y.float() - beta) * g).sum(-1) / (g * g).sum(-1).clamp_min(1e-30)


def head_readout_matrix(adapter: BoundAdapter, layer: int, gamma: torch.Tensor,
                        centred: bool) -> torch.Tensor:
    """G = W_O^h C diag(gamma): (n_heads, d_head, d_model); logits = s * z G W_U^T."""
    return centre(adapter.w_write(layer), centred) * gamma


@contextmanager
def clean_run(adapter: BoundAdapter) -> Iterator[dict[str, Any]]:
    """Capture every layer's z (batch, pos, n_heads, d_head) and the final norm's input/output."""
    store: dict[str, Any] = {}

    def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        store["norm_in"], store["norm_out"] = args[0].detach(), output.detach()

    handle = adapter.final_norm.register_forward_hook(keep)
    try:
        with capture_z(adapter) as zs:
            store["z"] = zs
            yield store
    finally:
        handle.remove()


# -- the family ---------------------------------------------------------------------------------
def check_corpus(options: dict[str, Any], window: int) -> tuple[str, str]:
    """Load the corpus on the driver so a bad one fails before the atlas is touched."""
    spec = options.get("corpus") or EMBEDDED
    text_field = options.get("text_field", "text")
    corpus = load_corpus(spec, text_field)
    words = sum(len(re.findall(r"\S+", text)) for text in corpus.texts)
    if words < window:  # every tokenizer here gives at least one token per word
        raise BadInput(f"the corpus {spec} has {words} words, too short for one window of {window} tokens",
                       "pass a longer corpus")
    return spec, corpus.corpus_id


class LensFamily:
    name = "lens"
    version = 2  # 2: Gemma 2/3 post-attention norm in the head write
    stores = ("head_metrics", "head_tokens")

    options = (
        Option("lens_window", "int", DEFAULTS["window"], "tokens per corpus window", min=4, max=131072),
        Option("lens_windows", "int", DEFAULTS["windows"], "corpus windows read", min=1, max=1_000_000),
        Option("lens_batch", "int", DEFAULTS["batch"], "windows per forward at most (fewer if memory is short)",
               min=1, max=4096),
        Option("lens_top_k", "int", DEFAULTS["top_k"], "promoted and suppressed tokens stored per head",
               min=1, max=1000),
        CORPUS, TEXT_FIELD,
    )

    # how the metrics are defined: stored with every run (runs.config.definitions), not hashed into its id
    definitions: ClassVar[dict[str, str]] = {
        "bos": WINDOWS_DEFINITION,
        "positions": "1 .. T-2 of each window (skip BOS; each has a known next token)",
        "final_norm": "frozen per-position scale from the clean run (y = s gamma C x + beta)",
        "readout": "mean_p(s_p z_p) through W_U diag(gamma) C W_O^h, centred over the vocab",
    }

    def config(self, options: dict[str, Any]) -> dict[str, Any]:
        o = resolve(self.options, options)
        window = o["lens_window"]
        spec, corpus_id = check_corpus(o, window)
        return {"corpus": spec, "corpus_id": corpus_id, "text_field": o["text_field"],
                "window": window, "windows": o["lens_windows"], "batch": o["lens_batch"], "top_k": o["lens_top_k"],
                "unembed_bias": "excluded"}

    def probe_set(self, config: dict[str, Any]) -> str:
        return f"corpus:{config['corpus_id']}:window={config['window']}:windows={config['windows']}"

    def run(self, lm: LoadedModel, config: dict[str, Any]) -> FamilyResult:
        corpus = load_corpus(config["corpus"], config["text_field"])
        if corpus.corpus_id != config["corpus_id"]:
            raise BadInput(f"the corpus {config['corpus']} changed since the build was planned",
                           "run the build again")
        tokens = token_windows(corpus, lm.tokenizer, config["window"], config["windows"],
                               bos=bos_id(lm.tokenizer))
        stats = LensStats(lm.adapter)
        # windows per forward: lens_batch at most, fewer where the free memory says so, halved on a retry;
        # each window's numbers are its own, so the split changes nothing stored
        step = scaled_batch(config, lens_batch(lm.model, lm.device, lm.dtype, tokens.shape[1], config["batch"]))
        for batch in tokens.split(step):
            stats.add(lm, batch)
        rows = stats.metric_rows()
        token_rows = stats.token_rows(lm.tokenizer, config["top_k"])
        return FamilyResult({"head_metrics": rows, "head_tokens": token_rows}, tokens=tokens.numel(),
                            extra_config={"n_windows": int(tokens.shape[0]), "positions": stats.positions,
                                          "corpus_provenance": corpus.provenance})


class LensStats:
    """Streaming per-head sums in head space; nothing per position survives a batch."""

    def __init__(self, adapter: BoundAdapter) -> None:
        self.adapter = adapter
        self.gamma, self.beta, self.centred = norm_affine(adapter)
        a = adapter
        self.sum_sz = torch.zeros(a.n_layers, a.n_heads, a.d_head)  # sum_p s_p z_p
        self.window_de: list[torch.Tensor] = []  # per window (n_layers, n_heads) mean, raw
        self.window_dec: list[torch.Tensor] = []  # the same, centred over the vocabulary
        self.positions = 0
        self.device = a.unembed.weight.device

    @torch.inference_mode()
    def add(self, lm: LoadedModel, tokens: torch.Tensor) -> None:
        a, w_u = self.adapter, self.adapter.unembed.weight.detach().float()  # (vocab, d_model)
        tokens = tokens.to(self.device)
        with clean_run(a) as run:
            lm.model(tokens, logits_to_keep=1, use_cache=False)  # reads the final norm, not the (T, vocab) logits
        s = frozen_scale(run["norm_in"], run["norm_out"], self.gamma, self.beta, self.centred)  # (B, T)
        s = s[:, 1:-1]  # (B, P) positions 1 .. T-2
        u = w_u[tokens[:, 2:]]  # (B, P, d_model): rows of the actual next tokens
        u_mean = w_u.mean(0)  # (d_model,)
        de = torch.empty(tokens.shape[0], a.n_layers, a.n_heads, device=self.device)
        dec = torch.empty_like(de)
        for layer in range(a.n_layers):
            z = a.write_input(layer, run["z"][layer][:, 1:-1].float())  # (B, P, H, K); Gemma 2/3: 1/rms in
            g = head_readout_matrix(a, layer, self.gamma, self.centred)  # (H, K, d_model)
            target = torch.einsum("bpd,hkd->bphk", u, g)  # next-token rows in head space (B, P, H, K)
            mean_row = torch.einsum("d,hkd->hk", u_mean, g)  # (H, K)
            raw = (target * z).sum(-1) * s[..., None]  # (B, P, H)
            flat = (mean_row * z).sum(-1) * s[..., None]  # (B, P, H)
            de[:, layer] = raw.mean(1)
            dec[:, layer] = (raw - flat).mean(1)
            self.sum_sz[layer] += (z * s[..., None, None]).sum((0, 1)).cpu()
        self.window_de.append(de.cpu())
        self.window_dec.append(dec.cpu())
        self.positions += s.numel()

    def metric_rows(self) -> list[dict[str, Any]]:
        rows = []
        for metric, per_window in (("lens.direct_effect", self.window_de),
                                   ("lens.direct_effect_centered", self.window_dec)):
            stacked = torch.cat(per_window)  # (n_windows, L, H)
            n = stacked.shape[0]
            stderr = stacked.std(0) / n**0.5 if n > 1 else None
            rows += head_metric_rows(metric, stacked.mean(0), stderr, n)
        return rows

    def mean_dla(self, layer: int) -> torch.Tensor:
        """Mean DLA over positions, centred over the vocabulary: (n_heads, vocab)."""
        a = self.adapter
        mean_sz = (self.sum_sz[layer] / max(self.positions, 1)).to(self.device)  # (H, K)
        g = head_readout_matrix(a, layer, self.gamma, self.centred)  # (H, K, d_model)
        out = torch.einsum("hk,hkd->hd", mean_sz, g)  # mean direct write per head, (H, d_model)
        logits = out @ a.unembed.weight.detach().float().T  # (H, vocab)
        return logits - logits.mean(-1, keepdim=True)

    @torch.inference_mode()
    def token_rows(self, tokenizer: Any, top_k: int) -> list[dict[str, Any]]:
        rows = []
        for layer in range(self.adapter.n_layers):
            rows += readout_rows(layer, self.mean_dla(layer), tokenizer, top_k, ("promote", "suppress"))
        return rows


def readout_rows(layer: int, logits: torch.Tensor, tokenizer: Any, top_k: int,
                 kinds: tuple[str, ...]) -> list[dict[str, Any]]:
    """head_tokens rows from per-head vocab scores (n_heads, vocab): top (and bottom) k each."""
    rows = []
    k = min(top_k, logits.shape[-1])
    for kind, largest in zip(kinds, (True, False), strict=False):
        values, ids = logits.topk(k, dim=-1, largest=largest)
        for head in range(logits.shape[0]):
            texts = [tokenizer.decode([i]) for i in ids[head].tolist()]
            for rank, (tid, text, score) in enumerate(zip(ids[head].tolist(), texts,
                                                          values[head].tolist(), strict=True), 1):
                rows.append({"layer": layer, "head": head, "kind": kind, "rank": rank,
                             "token_id": int(tid), "token_text": text, "score": float(score)})
    return rows
