"""SOMP in head space (both criteria) against the direct least-squares reference, on random data."""

from __future__ import annotations

import pytest
import torch

from workers.families.pursuit.somp import CovarianceAccumulator, centred, somp_heads, somp_reference


def _problem(seed: int, n: int = 40, heads: int = 3, d_head: int = 6, d_model: int = 24, v: int = 30):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, heads, d_head, generator=gen, dtype=torch.float64)
    w_o = torch.randn(heads, d_head, d_model, generator=gen, dtype=torch.float64)
    dictionary = torch.randn(v, d_model, generator=gen, dtype=torch.float64)
    dictionary = dictionary / dictionary.norm(dim=1, keepdim=True)
    return z, w_o, dictionary


@pytest.mark.parametrize("criterion", ["l1", "l2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_sample_matches_reference(criterion: str, seed: int) -> None:
    z, w_o, dictionary = _problem(seed)
    result = somp_heads(centred(z), w_o, dictionary, steps=8, criterion=criterion)
    for h in range(z.shape[1]):
        atoms, evr = somp_reference(z[:, h] @ w_o[h], dictionary, 8, criterion)
        assert result.atoms[h].tolist() == atoms
        torch.testing.assert_close(result.evr[h], torch.tensor(evr, dtype=torch.float64), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 3])
def test_streamed_covariance_matches_reference_l2(seed: int) -> None:
    """The l2 criterion from a covariance streamed in batches: same atoms and EVR, no samples kept."""
    z, w_o, dictionary = _problem(seed)
    acc = CovarianceAccumulator(z.shape[1], z.shape[2])
    for batch in z.split(7):
        acc.update(batch)
    x, kept = acc.factor()
    torch.testing.assert_close(kept, torch.ones_like(kept))
    result = somp_heads(x, w_o, dictionary, steps=10, criterion="l2")
    for h in range(z.shape[1]):
        atoms, evr = somp_reference(z[:, h] @ w_o[h], dictionary, 10, "l2")
        assert result.atoms[h].tolist() == atoms
        torch.testing.assert_close(result.evr[h], torch.tensor(evr, dtype=torch.float64), rtol=1e-8, atol=1e-10)


def test_evr_is_monotone_and_reaches_one_on_a_spanning_dictionary() -> None:
    z, w_o, _ = _problem(4, d_model=10)
    basis = torch.eye(10, dtype=torch.float64)
    result = somp_heads(centred(z), w_o, basis, steps=10)
    assert (result.gains >= -1e-12).all()
    torch.testing.assert_close(result.final_evr, torch.ones(3, dtype=torch.float64))


def test_planted_atoms_are_recovered_first() -> None:
    """Outputs built from 3 dictionary rows: SOMP picks exactly those and explains ~all variance."""
    gen = torch.Generator().manual_seed(5)
    d_model, v = 32, 50
    dictionary = torch.randn(v, d_model, generator=gen, dtype=torch.float64)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    planted = [7, 21, 42]
    w_o = dictionary[planted].unsqueeze(0)  # (1, d_head=3, d_model): the head writes only these atoms
    z = torch.randn(60, 1, 3, generator=gen, dtype=torch.float64)
    for criterion in ("l1", "l2"):
        result = somp_heads(centred(z), w_o, dictionary, steps=3, criterion=criterion)
        assert sorted(result.atoms[0].tolist()) == planted
        assert result.final_evr[0] > 1 - 1e-9


def test_per_head_dictionaries_match_shared() -> None:
    z, w_o, dictionary = _problem(6)
    shared = somp_heads(centred(z), w_o, dictionary, steps=5)
    per_head = somp_heads(centred(z), w_o, dictionary.expand(3, *dictionary.shape).clone(), steps=5)
    assert torch.equal(shared.atoms, per_head.atoms)


def test_rank_truncation_keeps_the_leading_variance() -> None:
    z, _, _ = _problem(7)
    acc = CovarianceAccumulator(z.shape[1], z.shape[2])
    acc.update(z)
    _, kept_full = acc.factor()
    x2, kept2 = acc.factor(rank=2)
    assert x2.shape[1] == 2
    assert ((kept2 > 0) & (kept2 < kept_full)).all()


def test_unknown_criterion_is_refused() -> None:
    z, w_o, dictionary = _problem(0)
    with pytest.raises(ValueError, match="criterion"):
        somp_heads(centred(z), w_o, dictionary, steps=2, criterion="max")


def test_a_repeated_atom_adds_nothing_and_breaks_nothing() -> None:
    """Untrained tokens can share one embedding row: the copy must add zero variance, never NaN or EVR > 1."""
    z, w_o, _ = _problem(4, d_model=8)
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    dictionary = torch.cat([rows, rows[2:3]])  # atom 8 repeats atom 2
    result = somp_heads(centred(z), w_o, dictionary, steps=9)
    assert torch.isfinite(result.evr).all()
    assert (result.gains >= -1e-9).all() and (result.final_evr <= 1 + 1e-9).all()
    for h in range(result.atoms.shape[0]):
        picks = result.atoms[h].tolist()
        second = max(picks.index(2), picks.index(8))
        assert abs(float(result.gains[h, second])) < 1e-9
    torch.testing.assert_close(result.final_evr, torch.ones_like(result.final_evr))
