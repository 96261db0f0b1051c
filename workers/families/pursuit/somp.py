"""Simultaneous Orthogonal Matching Pursuit (SOMP) for every head at once (Head Pursuit, arXiv 2510.21518).

SOMP explains a head's centred outputs H_c (n x d) with a few rows ("atoms") of a dictionary D
(v x d, here the unembedding): each step picks the atom most correlated with the residual over
all samples, refits on the chosen atoms by least squares, and updates the residual. The score is
the explained variance ratio EVR = 1 - ||R_T||^2 / ||H_c||^2, in [0, 1], higher = the head's
output lies more in the span of the chosen atoms.

Two selection criteria (ResiDual's `somp(..., criterion=)`):
- "l1": sum over samples of |<d_j, r_i>| (the paper's). Needs the per-sample pooled z.
- "l2": sum over samples of <d_j, r_i>^2. Needs only the head's covariance C_z = L L^T, which is
  streamed (`CovarianceAccumulator`), so nothing per sample is stored.

Both run in head space (reference note, section 3): a head's output is H = Z W_O^h, so with
A_h = D W_O^h^T (v x d_head) the correlations are A_h X^T, where X holds either the centred z
rows (l1) or the rows of L^T (l2). An orthonormal basis Q of the chosen atoms (Gram-Schmidt)
turns each refit into a rank-1 update: P <- P - (D q)(X W q)^T. Q is kept as coefficients over
the chosen atoms, so D q and X W q are combinations of the atom-atom Gram rows and of the first
step's correlations: nothing d_model- or d_head-sized is touched inside the loop. `somp_reference` is the direct
d-space version with a least-squares refit every step; tests check both give the same atoms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CRITERIA = ("l1", "l2")


def _score(p: torch.Tensor, criterion: str) -> torch.Tensor:
    """Selection score per atom: p (..., v, m) -> (..., v)."""
    if criterion == "l1":  # |p| summed: the same 1-norm, 4x faster than vector_norm(ord=1) in float64 on a CPU
        return p.abs().sum(-1)
    if criterion == "l2":
        return torch.linalg.vector_norm(p, ord=2, dim=-1).square()
    raise ValueError(f"unknown SOMP criterion {criterion!r}; use one of {CRITERIA}")


def somp_reference(h: torch.Tensor, d: torch.Tensor, steps: int, criterion: str = "l1",
                   center: bool = True) -> tuple[list[int], list[float]]:
    """Direct SOMP: h (n, d_model), d (v, d_model) -> (atoms in selection order, EVR after each step).

    Mirrors ResiDual's `somp`: mask chosen atoms, full float64 least squares every step.
    """
    h = h.double()
    d = d.double()
    hc = h - h.mean(0, keepdim=True) if center else h
    total = hc.square().sum()
    residual = hc.clone()
    chosen: list[int] = []
    evr: list[float] = []
    for _ in range(min(steps, d.shape[0])):
        score = _score(d @ residual.T, criterion)  # (v,)
        score[chosen] = -1.0
        chosen.append(int(score.argmax()))
        atoms = d[chosen]  # (s, d_model)
        coef = torch.linalg.lstsq(atoms.T, hc.T).solution  # (s, n)
        residual = hc - (atoms.T @ coef).T
        evr.append(float(1 - residual.square().sum() / total))
    return chosen, evr


@dataclass
class SompResult:
    atoms: torch.Tensor  # (heads, T) dictionary row indices, selection order
    evr: torch.Tensor  # (heads, T) explained variance ratio after each step (cumulative)

    @property
    def final_evr(self) -> torch.Tensor:  # (heads,)
        return self.evr[:, -1] if self.evr.shape[1] else torch.zeros(self.evr.shape[0], dtype=self.evr.dtype)

    @property
    def gains(self) -> torch.Tensor:  # (heads, T) variance explained by each atom as it was added
        return torch.diff(self.evr, dim=1, prepend=torch.zeros_like(self.evr[:, :1]))


def output_variance(x: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """||X W_O||_F^2 per head, (heads,): the EVR's denominator. It costs heads x d_head^2 x d_model, as much
    as a dictionary's projection, and is the same for every dictionary of a ranking: compute it once."""
    x, w_o = x.double(), w_o.double()
    return ((x @ (w_o @ w_o.transpose(1, 2))) * x).sum((1, 2))


def somp_heads(x: torch.Tensor, w_o: torch.Tensor, dictionary: torch.Tensor, steps: int,
               criterion: str = "l1", total: torch.Tensor | None = None) -> SompResult:
    """SOMP for many heads at once, in head space.

    x: (heads, m, d_head) centred pooled z rows (criterion l1), or covariance factor rows L^T (l2)
    w_o: (heads, d_head, d_model) each head's W_O
    dictionary: (v, d_model) shared, or (heads, v, d_model) one per head
    total: `output_variance(x, w_o)` when the caller has it (many dictionaries, one x)
    Returns atoms and cumulative EVR, (heads, T) with T = min(steps, v).
    """
    x, w_o, dictionary = x.double(), w_o.double(), dictionary.double()
    n_heads, _, _ = x.shape
    shared = dictionary.dim() == 2  # one dictionary for all heads: never expanded (heads x v x d_model)
    v = dictionary.shape[-2]
    steps = min(steps, v)
    a = torch.einsum("vm,hkm->hvk" if shared else "hvm,hkm->hvk", dictionary, w_o)  # (heads, v, d_head): D W_O^T
    p0 = a @ x.transpose(1, 2)  # (heads, v, m): correlations of every atom with every centred output row
    # atom-atom inner products: a shared dictionary's (v, v) once; per-head dictionaries (the readout's
    # shortlists, v = 512) only the chosen atoms' rows, one per step (T x v, not v x v, per head)
    gram = dictionary @ dictionary.transpose(-1, -2) if shared else None
    total = output_variance(x, w_o) if total is None else total.double()  # (heads,) ||X W_O||_F^2
    p = p0.clone()
    rows = torch.arange(n_heads)
    taken = torch.zeros(n_heads, v, dtype=torch.bool)
    atoms = torch.zeros(n_heads, steps, dtype=torch.long)
    coef = torch.zeros(n_heads, steps, steps, dtype=x.dtype)  # q_t = sum_s coef[t, s] d_{atoms[s]}
    g_sel = torch.zeros(n_heads, steps, v, dtype=x.dtype)  # D d_{atoms[s]}: the chosen atoms' gram rows
    p_sel = torch.zeros(n_heads, steps, p0.shape[2], dtype=x.dtype)  # H_c d_{atoms[s]}
    explained = torch.zeros(n_heads, dtype=x.dtype)
    evr = torch.zeros(n_heads, steps, dtype=x.dtype)
    for t in range(steps):
        score = _score(p, criterion).masked_fill(taken, -1.0)  # (heads, v)
        pick = score.argmax(1)  # (heads,)
        atoms[:, t] = pick
        taken[rows, pick] = True
        g_sel[:, t] = gram[pick] if gram is not None else (dictionary @ dictionary[rows, pick][:, :, None])[..., 0]
        p_sel[:, t] = p0[rows, pick]
        # Gram-Schmidt in the chosen atoms' coordinates: nothing in d_model space inside the loop.
        c = torch.zeros(n_heads, t + 1, dtype=x.dtype)
        c[:, t] = 1.0
        if t:
            cross = g_sel[:, t].gather(1, atoms[:, :t])  # (heads, t): <d_{atoms[s]}, d_new>
            proj = (coef[:, :t, :t] @ cross[:, :, None])[..., 0]  # (heads, t): <q_s, d_new>
            c[:, :t] -= (proj[:, :, None] * coef[:, :t, :t]).sum(1)
        sub = g_sel[:, :t + 1].gather(2, atoms[:, None, :t + 1].expand(-1, t + 1, -1))  # (heads, t+1, t+1)
        norm = (c[:, None, :] @ sub @ c[:, :, None])[:, 0, 0].clamp_min(0.0).sqrt()
        self_norm = sub[:, t, t].clamp_min(0.0).sqrt()
        # An atom (numerically) in the span already contributes nothing. The norm comes from a
        # quadratic form, whose rounding error is ~1e-8 relative in float64: hence 1e-6, not 1e-10.
        ok = norm > 1e-6 * self_norm.clamp_min(1e-30)
        c = torch.where(ok[:, None], c / norm.clamp_min(1e-30)[:, None], torch.zeros_like(c))
        coef[:, t, :t + 1] = c
        dq = (c[:, None, :] @ g_sel[:, :t + 1])[:, 0]  # (heads, v): D q
        xq = (c[:, None, :] @ p_sel[:, :t + 1])[:, 0]  # (heads, m): H_c q
        p.baddbmm_(dq[:, :, None], xq[:, None, :], alpha=-1.0)  # rank-1 residual update, in place
        explained = explained + xq.square().sum(1)
        evr[:, t] = explained / total.clamp_min(1e-300)
    return SompResult(atoms, evr)


class CovarianceAccumulator:
    """Streamed per-head covariance of pooled z: nothing per sample is kept (criterion l2)."""

    def __init__(self, n_heads: int, d_head: int) -> None:
        self.n = 0
        self.sum = torch.zeros(n_heads, d_head, dtype=torch.float64)
        self.outer = torch.zeros(n_heads, d_head, d_head, dtype=torch.float64)

    def update(self, z: torch.Tensor) -> None:
        """z: (batch, heads, d_head) pooled head activations of a batch of samples."""
        z = z.double()
        self.n += z.shape[0]
        self.sum += z.sum(0)
        self.outer += torch.einsum("bhk,bhl->hkl", z, z)

    @property
    def mean(self) -> torch.Tensor:  # (heads, d_head)
        return self.sum / max(self.n, 1)

    def scatter(self) -> torch.Tensor:
        """Centred scatter matrix Z_c^T Z_c per head: (heads, d_head, d_head)."""
        mu = self.mean
        return self.outer - self.n * torch.einsum("hk,hl->hkl", mu, mu)

    def factor(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of L^T with L L^T = scatter, keeping the top `rank` eigen-directions.

        Returns x (heads, r, d_head) for `somp_heads` and the fraction of variance kept, (heads,).
        """
        evals, evecs = torch.linalg.eigh(self.scatter())  # ascending
        evals = evals.clamp_min(0.0)
        r = evals.shape[1] if rank is None else min(rank, evals.shape[1])
        top_vals, top_vecs = evals[:, -r:], evecs[:, :, -r:]  # (heads, r), (heads, d_head, r)
        x = (top_vecs * top_vals.sqrt()[:, None, :]).transpose(1, 2)  # (heads, r, d_head)
        kept = top_vals.sum(1) / evals.sum(1).clamp_min(1e-300)
        return x, kept


def centred(z: torch.Tensor) -> torch.Tensor:
    """Per-sample pooled z (n, heads, d_head) -> centred rows per head (heads, n, d_head) for l1."""
    z = z.double()
    return (z - z.mean(0, keepdim=True)).transpose(0, 1)
