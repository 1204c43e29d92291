"""The streaming radix select (methods/select.py) against torch's whole-tensor kthvalue and stable
argsort, on random tensors with many exact ties, in one block and in many."""

from __future__ import annotations

import pytest
import torch

from mergeflow.methods.select import RankSelect, Window, magnitude_keys, ranked_mask


def tied_tensor(seed: int, shape=(37, 23)) -> torch.Tensor:
    """Random signed values, a third of them drawn from 5 levels (exact ties, +0 and -0 among them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    levels = torch.tensor([0.0, -0.0, 0.5, -0.5, 1.25])
    pick = torch.rand(shape, generator=g) < 0.33
    return torch.where(pick, levels[torch.randint(0, 5, shape, generator=g)], x)


def stable_window(x: torch.Tensor, start: int, stop: int, descending: bool) -> torch.Tensor:
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[torch.argsort(x.abs().reshape(-1), descending=descending, stable=True)[start:stop]] = True
    return mask.reshape(x.shape)


def streamed(window: Window, keys: torch.Tensor, rows: int) -> torch.Tensor:
    blocks = [keys[i : i + rows] for i in range(0, keys.shape[0], rows)]
    for step in range(window.passes):
        for b in blocks:
            window.observe(step, b)
        window.end_pass(step)
    return torch.cat([window.mask(b) for b in blocks])


def test_keys_order_as_magnitudes():
    x = tied_tensor(0).reshape(-1)
    up, down = magnitude_keys(x), magnitude_keys(x, descending=True)
    assert torch.equal(torch.argsort(up, stable=True), torch.argsort(x.abs(), stable=True))
    assert torch.equal(torch.argsort(down, stable=True), torch.argsort(x.abs(), descending=True, stable=True))
    assert int(up[x == 0].max()) == 0 and int(down.min()) >= 0


@pytest.mark.parametrize("seed", range(3))
def test_rank_select_equals_kthvalue(seed):
    x = tied_tensor(seed)
    keys = magnitude_keys(x)
    ranks = [0, 1, 100, 400, x.numel() - 1]
    select = RankSelect()
    for step in range(2):
        for b in keys.split(5):
            select.observe(step, b)
        if step == 0:
            select.choose(ranks)
    found = select.finish()
    flat = x.abs().reshape(-1)
    for r in ranks:
        value = flat.kthvalue(r + 1).values
        rank = found[r]
        assert torch.tensor(rank.key, dtype=torch.int32).view(torch.float32) == value
        assert (rank.less, rank.count) == (int((flat < value).sum()), int((flat == value).sum()))


@pytest.mark.parametrize("rows", [1, 4, 37])
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("start,stop", [(0, 300), (120, 500), (250, 851), (0, 851), (400, 400), (0, 1)])
def test_window_is_the_stable_argsort_slice_in_any_blocks(rows, descending, start, stop):
    x = tied_tensor(rows)
    got = streamed(Window(x.numel(), start, stop), magnitude_keys(x, descending), rows)
    assert torch.equal(got, stable_window(x, start, stop, descending))


@pytest.mark.parametrize("rows", [1, 6, 37])
def test_keep_ties_keeps_everything_at_least_the_kth_value(rows):
    x = tied_tensor(7)
    k = 500
    threshold = x.abs().reshape(-1).kthvalue(x.numel() - k + 1).values
    got = streamed(Window(x.numel(), x.numel() - k, x.numel(), keep_ties=True), magnitude_keys(x), rows)
    assert torch.equal(got, x.abs() >= threshold) and int(got.sum()) > k  # the ties at the threshold come along


def test_window_masks_again_after_restart():
    x = tied_tensor(3)
    window = Window(x.numel(), 100, 600)
    first = streamed(window, magnitude_keys(x), 5)
    window.restart()
    again = torch.cat([window.mask(b) for b in magnitude_keys(x).split(5)])
    assert torch.equal(first, again)


def test_ranked_mask_of_a_whole_tensor():
    x = torch.tensor([3.0, -1.0, 1.0, 0.0, -3.0, 2.0])
    assert ranked_mask(x, 0, 3, descending=True).tolist() == [True, False, False, False, True, True]
    assert ranked_mask(x, 1, 3).tolist() == [False, True, True, False, False, False]
