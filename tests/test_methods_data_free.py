"""mergekit's data-free methods on small tensors computed by hand, and the properties mergekit does
not define (seeded reproducibility, TIES's two conventions side by side, closed forms)."""

from __future__ import annotations

import math

import pytest
import torch

from mergeflow.methods import sparsify as sp
from mergeflow.methods.karcher import karcher_mean
from mergeflow.methods.model_stock import model_stock
from mergeflow.methods.slerp import slerp


def test_mergekit_ties_keeps_the_floor_and_takes_the_weighted_mean():
    """Hand-computed: base 0, A = [1, -2, 0.4, 3], B = [-1, 1.5, 0.2, 3], weights 3 and 1,
    density 0.6 of 4 entries: mergekit keeps floor(2.4) = 2 per expert, A -> [0, -2, 0, 3],
    B -> [0, 1.5, 0, 3]; weighted [0, -6, 0, 9] and [0, 1.5, 0, 3]; signs of the sum
    [0, -4.5, 0, 12] -> [+, -, +, +]; agreeing mass / agreeing weight: [0, -6/3, 0, 12/4]."""
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, -2.0, 0.4, 3.0]), torch.tensor([-1.0, 1.5, 0.2, 3.0])
    merged = sp.merge_task_vectors(base, [a, b], [3.0, 1.0], sparsify=lambda d, i: sp.magnitude(d, 0.6), consensus=True, normalize=True)
    assert merged.tolist() == [0.0, -2.0, 0.0, 3.0]


def test_mergekit_ties_elects_plus_on_an_exact_sign_tie():
    """Hand-computed: task vectors [1, 2] and [-1, 1]: the first entry's sum is exactly 0; mergekit
    elects +, so it keeps 1 (weight 1): [1, 1.5]."""
    merged = sp.merge_task_vectors(torch.zeros(2), [torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 1.0])], [1.0, 1.0], consensus=True, normalize=True)
    assert merged.tolist() == [1.0, 1.5]


def test_magnitude_keeps_at_least_one_entry():
    """Hand-computed: density 0.1 of 4 entries floors to 0; mergekit keeps max(1, 0) = 1."""
    assert sp.magnitude(torch.tensor([0.5, -3.0, 1.0, 2.0]), 0.1).tolist() == [0.0, -3.0, 0.0, 0.0]


def test_breadcrumbs_drops_the_outliers_then_the_smallest():
    """Hand-computed: 10 entries 1..10, gamma 0.2 drops the 2 largest, density 0.5 keeps the next 5:
    entries 4..8."""
    delta = torch.arange(1.0, 11.0)
    assert sp.magnitude_outliers(delta, 0.5, 0.2).tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 0, 0]


def test_rescale_matches_the_l1_norm():
    """Hand-computed: [1, -2, 3, -4] keeping the two largest [0, 0, 3, -4] (L1 7 of 10) is scaled by 10/7."""
    kept = sp.magnitude(torch.tensor([1.0, -2.0, 3.0, -4.0]), 0.5, rescale=True)
    torch.testing.assert_close(kept, torch.tensor([0.0, 0.0, 3.0, -4.0]) * 10 / 7)


def test_dare_is_reproducible_per_seed_and_tensor_name():
    """Same (seed, tensor name): the same bytes; another name or seed: another mask. The mask keeps
    about `density` of the entries."""
    delta = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))

    def dare(seed, name):
        return sp.bernoulli(delta, 0.3, sp.tensor_generator(seed, name), rescale=False)

    first = dare(7, "model.layers.0.mlp.up_proj.weight")
    assert torch.equal(first, dare(7, "model.layers.0.mlp.up_proj.weight"))
    assert not torch.equal(first, dare(7, "model.layers.1.mlp.up_proj.weight"))
    assert not torch.equal(first, dare(8, "model.layers.0.mlp.up_proj.weight"))
    kept = (first != 0).float().mean().item()
    assert 0.25 < kept < 0.35
    assert torch.equal(first[first != 0], delta[first != 0])


def test_della_probabilities_rise_with_magnitude():
    """DELLA with density 0.5, epsilon 0.4: the smallest entry of each row is kept with probability
    0.1, the largest with 0.9; over 4000 rows of [1, 2, 3, 4, 5] the kept fractions are
    0.1, 0.3, 0.5, 0.7, 0.9 (to sampling error)."""
    rows = torch.arange(1.0, 6.0).repeat(4000, 1)
    kept = sp.della_magprune(rows, 0.5, 0.4, torch.Generator().manual_seed(0), rescale=False) != 0
    torch.testing.assert_close(kept.float().mean(dim=0), torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]), atol=0.03, rtol=0)


def test_della_refuses_a_band_outside_0_1():
    with pytest.raises(ValueError, match=r"^della: density \+/- epsilon must lie in \(0, 1\), got density 0.5 and epsilon 0.6$"):
        sp.della_magprune(torch.ones(2, 3), 0.5, 0.6, torch.Generator())


def test_slerp_of_orthogonal_vectors():
    """Hand-computed: halfway between [2, 0] and [0, 2] on the circle of radius 2 is [sqrt 2, sqrt 2];
    at t = 1/3 it is 2 [cos 30deg, sin 30deg]."""
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    torch.testing.assert_close(slerp(0.5, a, b), torch.tensor([math.sqrt(2), math.sqrt(2)]))
    torch.testing.assert_close(slerp(1 / 3, a, b), torch.tensor([math.sqrt(3), 1.0]))


def test_slerp_of_parallel_vectors_is_linear():
    """Hand-computed: [1, 1] and [3, 3] are parallel: (1 - 0.25) [1, 1] + 0.25 [3, 3] = [1.5, 1.5]."""
    torch.testing.assert_close(slerp(0.25, torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0])), torch.tensor([1.5, 1.5]))


def test_karcher_mean_of_two_is_slerp_of_the_directions():
    """Closed form: the weighted Karcher mean of two points on the sphere lies on their geodesic at
    the second one's weight; its norm is the weighted mean norm. Weights 0.25, 0.75."""
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 1.0])
    direction = slerp(0.75, a / a.norm(), b / b.norm())
    expected = direction * (0.25 * 3 + 0.75 * math.sqrt(2))
    torch.testing.assert_close(karcher_mean([a, b], [0.25, 0.75], max_iter=50, tol=1e-7), expected, atol=1e-5, rtol=0)


def test_model_stock_by_hand():
    """Hand-computed: orthogonal task vectors (cos 0) give t = 0, the base; equal ones (cos 1) give
    t = 2 / 2 = 1, the experts' mean; cos 0.5 gives t = 1 / 1.5 = 2/3."""
    base = torch.tensor([1.0, 1.0])
    assert model_stock(base, [base + torch.tensor([1.0, 0.0]), base + torch.tensor([0.0, 1.0])]).tolist() == [1.0, 1.0]
    torch.testing.assert_close(model_stock(base, [base + 2, base + 2]), base + 2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])  # 60 degrees apart
    torch.testing.assert_close(model_stock(base, [base + a, base + b]), base + (2 / 3) * (a + b) / 2)
