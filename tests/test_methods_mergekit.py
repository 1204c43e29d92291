"""mergekit's data-free methods against mergekit 0.1.5's own tensor functions, on the tensors of
tiny random Llamas (a base and three experts): every test here compares with mergekit, called
through its merge-method registry on one tensor group at a time. Random methods (DARE, DELLA)
draw the same masks as mergekit: our generator and torch's global one get the same seed."""

from __future__ import annotations

import pytest
import torch

from mergeflow.methods import sparsify as sp
from mergeflow.methods.karcher import karcher_mean
from mergeflow.methods.model_stock import model_stock
from mergeflow.methods.nuslerp import interpolation_t, nuslerp
from mergeflow.methods.sce import sce
from mergeflow.methods.slerp import slerp

from helpers import make_tiny_llama, state

pytest.importorskip("mergekit")
from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

WEIGHTS = [0.7, 1.3, 0.5]


@pytest.fixture(scope="module")
def llamas(experts, tmp_path_factory) -> dict[str, list[torch.Tensor]]:
    """tensor name -> [base, expert 0, expert 1, expert 2] of four tiny random Llamas."""
    root = tmp_path_factory.mktemp("mk")
    models = [state(make_tiny_llama(root / "base", seed=10)), *map(state, experts), state(make_tiny_llama(root / "e2", seed=11))]
    return {name: [m[name] for m in models] for name in models[0]}


def mergekit(method: str, tensors: list[torch.Tensor], base_index: int | None = 0, **params) -> torch.Tensor:
    group = TensorGroup.from_tensors(tensors, base_index=base_index)
    return registry.get(method)([group], parameters=params)[0]


def each(llamas):
    for name, (base, *experts) in llamas.items():
        yield name, base, experts


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(ours, theirs, msg=lambda m: f"{name}: {m}")


# method, consensus, normalize, rescale, sparsifier (by kind), mergekit's extra parameters
TASK_VECTOR_METHODS = {
    "ties": (True, True, False, "magnitude", {}),
    "dare_linear": (False, False, True, "random", {}),
    "dare_ties": (True, False, True, "random", {}),
    "della": (True, True, True, "della", {"epsilon": 0.1}),
    "della_linear": (False, False, True, "della", {"epsilon": 0.1}),
    "breadcrumbs": (False, False, False, "outliers", {"gamma": 0.05}),
    "breadcrumbs_ties": (True, False, False, "outliers", {"gamma": 0.05}),
}


def sparsifier(kind: str, density: float, rescale: bool, extra: dict, generator: torch.Generator):
    if kind == "magnitude":
        return lambda d, i: sp.magnitude(d, density, rescale)
    if kind == "random":
        return lambda d, i: sp.bernoulli(d, density, generator, rescale)
    if kind == "della":
        return lambda d, i: sp.della_magprune(d, density, extra["epsilon"], generator, rescale)
    return lambda d, i: sp.magnitude_outliers(d, density, extra["gamma"], rescale)


@pytest.mark.parametrize("method", TASK_VECTOR_METHODS)
def test_task_vector_methods_match_mergekit(llamas, method):
    """Equal to mergekit 0.1.5 (its defaults of normalize/rescale, weights 0.7/1.3/0.5, density
    0.4, lambda 0.8), random masks drawn identically."""
    consensus, normalize, rescale, kind, extra = TASK_VECTOR_METHODS[method]
    for name, base, experts in each(llamas):
        seed = len(name)
        torch.manual_seed(seed)
        theirs = mergekit(method, [base, *experts], weight=WEIGHTS, density=0.4, **extra, **{"lambda": 0.8})
        thin = sparsifier(kind, 0.4, rescale, extra, torch.Generator().manual_seed(seed))
        ours = sp.merge_task_vectors(base, experts, WEIGHTS, sparsify=thin, consensus=consensus, normalize=normalize, scaling=0.8)
        assert_same(ours, theirs, name)


def test_slerp_matches_mergekit(llamas):
    """Equal to mergekit's slerp (base_model = our first expert) at t = 0.3: independent random
    Llamas are far from parallel, so the spherical branch is what is compared."""
    for name, _, (a, b, _) in each(llamas):
        assert_same(slerp(0.3, a, b), mergekit("slerp", [a, b], t=0.3), name)


@pytest.mark.parametrize("row_wise", [False, True])
@pytest.mark.parametrize("flatten", [False, True])
def test_nuslerp_matches_mergekit(llamas, row_wise, flatten):
    """Equal to mergekit's nuslerp, weights 1 and 3 (t = 0.75), without and with a base model."""
    flags = dict(nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
    t = interpolation_t([1.0, 3.0])
    for name, base, (a, b, _) in each(llamas):
        assert_same(nuslerp(t, a, b, row_wise=row_wise, flatten=flatten), mergekit("nuslerp", [a, b], None, weight=[1.0, 3.0], **flags), name)
        with_base = base + nuslerp(t, a - base, b - base, row_wise=row_wise, flatten=flatten)
        assert_same(with_base, mergekit("nuslerp", [base, a, b], weight=[1.0, 3.0], **flags), name)


def test_karcher_matches_mergekit(llamas):
    """Equal to mergekit's karcher (equal weights, its defaults max_iter 10, tol 1e-5) over three experts."""
    for name, _, experts in each(llamas):
        assert_same(karcher_mean(experts, [1 / 3] * 3), mergekit("karcher", experts, None), name)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(llamas, filter_wise):
    """Equal to mergekit's model_stock over a base and three experts."""
    for name, base, experts in each(llamas):
        assert_same(model_stock(base, experts, filter_wise=filter_wise), mergekit("model_stock", [base, *experts], filter_wise=filter_wise), name)


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_matches_mergekit(llamas, select_topk):
    """Equal to mergekit's sce over a base and three experts, with and without the variance selection."""
    for name, base, experts in each(llamas):
        assert_same(sce(base, experts, select_topk=select_topk), mergekit("sce", [base, *experts], select_topk=select_topk), name)
