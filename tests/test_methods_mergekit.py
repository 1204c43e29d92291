"""mergekit's data-free methods against mergekit 0.1.5's own merge functions, on the tensors of
tiny random Llamas (a base and three experts): every test here builds our method as the engine
does (`get_method(name)(values)`, `prepare`) and compares each tensor with mergekit's, called
through its merge-method registry on that tensor. Random methods (DARE, DELLA) keep the same
entries as mergekit: torch's global generator, which mergekit draws from, gets the state of the
generator our method seeds for the tensor."""

from __future__ import annotations

import pytest
import torch

from mergeflow.methods import get_method
from mergeflow.methods.sparsify import tensor_generator

from helpers import make_tiny_llama, state

pytest.importorskip("mergekit")
from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402

WEIGHTS = [0.7, 1.3, 0.5]


@pytest.fixture(scope="module")
def llamas(experts, tmp_path_factory) -> dict[str, list[torch.Tensor]]:
    """tensor name -> [base, expert 0, expert 1, expert 2] of four tiny random Llamas (2 layers)."""
    root = tmp_path_factory.mktemp("mk")
    models = [state(make_tiny_llama(root / "base", seed=10)), *map(state, experts), state(make_tiny_llama(root / "e2", seed=11))]
    return {name: [m[name] for m in models] for name in models[0]}


def mergekit(method: str, tensors: list[torch.Tensor], base_index: int | None = 0, **params) -> torch.Tensor:
    group = TensorGroup.from_tensors(tensors, base_index=base_index)
    return registry.get(method)([group], parameters=params)[0]


def ours(method: str, values: dict, llamas: dict):
    m = get_method(method)(values)
    m.prepare(list(llamas), num_experts=len(next(iter(llamas.values()))) - 1)
    return m


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    torch.testing.assert_close(ours, theirs, msg=lambda m: f"{name}: {m}")


# our method and values -> mergekit's method and parameters (lambda is our scaling, weight our weights)
TASK_VECTOR_CASES = {
    "ties-mergekit": ("ties", {"convention": "mergekit"}, "ties", {}),
    "dare_linear": ("dare_linear", {"seed": 3}, "dare_linear", {}),
    "dare_ties": ("dare_ties", {"seed": 4}, "dare_ties", {}),
    "dare_ties-normalized": ("dare_ties", {"normalize": True, "rescale": False}, "dare_ties", {"normalize": True, "rescale": False}),
    "della": ("della", {"epsilon": 0.1}, "della", {"epsilon": 0.1}),
    "della_linear": ("della_linear", {"epsilon": 0.1, "seed": 9}, "della_linear", {"epsilon": 0.1}),
    "breadcrumbs": ("breadcrumbs", {"gamma": 0.05}, "breadcrumbs", {"gamma": 0.05}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"gamma": 0.05, "rescale": True}, "breadcrumbs_ties", {"gamma": 0.05, "rescale": True}),
}


@pytest.mark.parametrize("case", TASK_VECTOR_CASES)
def test_task_vector_methods_match_mergekit(llamas, case):
    """Equal to mergekit 0.1.5 (weights 0.7/1.3/0.5, density 0.4, lambda 0.8, each method's
    defaults of normalize/rescale unless set), random masks drawn identically."""
    method, values, theirs_name, theirs_params = TASK_VECTOR_CASES[case]
    m = ours(method, {"weights": WEIGHTS, "density": 0.4, "scaling": 0.8, **values}, llamas)
    for name, (base, *experts) in llamas.items():
        torch.set_rng_state(tensor_generator(values.get("seed", 0), name).get_state())
        theirs = mergekit(theirs_name, [base, *experts], weight=WEIGHTS, density=0.4, **theirs_params, **{"lambda": 0.8})
        assert_same(m.merge(name, experts, base=base), theirs, name)


def test_per_layer_density_matches_mergekit_layer_by_layer(llamas):
    """A density gradient [0.2, 0.6] over the 2 layers (mergekit's convention: block i of n at
    i / (n - 1); the other tensors at 0): each tensor equals mergekit's ties at that density."""
    m = ours("ties", {"convention": "mergekit", "density": [0.2, 0.6]}, llamas)
    densities = set()
    for name, (base, *experts) in llamas.items():
        density = 0.6 if ".layers.1." in name else 0.2
        densities.add(density)
        assert_same(m.merge(name, experts, base=base), mergekit("ties", [base, *experts], weight=1.0, density=density), name)
    assert densities == {0.2, 0.6}


def test_slerp_matches_mergekit(llamas):
    """Equal to mergekit's slerp (its base_model is our first expert) at t = 0.3: independent random
    Llamas are far from parallel, so the spherical branch is what is compared."""
    m = ours("slerp", {"t": 0.3}, {k: v[:3] for k, v in llamas.items()})
    for name, (_, a, b, _) in llamas.items():
        assert_same(m.merge(name, [a, b]), mergekit("slerp", [a, b], t=0.3), name)


@pytest.mark.parametrize("row_wise", [False, True])
@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("use_base", [False, True])
def test_nuslerp_matches_mergekit(llamas, row_wise, flatten, use_base):
    """Equal to mergekit's nuslerp, weights 1 and 3 (t = 0.75), without a base model and with one."""
    flags = dict(nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
    m = ours("nuslerp", {"weights": [1.0, 3.0], "use_base": use_base, **flags}, {k: v[:3] for k, v in llamas.items()})
    assert m.uses_base == use_base
    for name, (base, a, b, _) in llamas.items():
        theirs = mergekit("nuslerp", [base, a, b] if use_base else [a, b], 0 if use_base else None, weight=[1.0, 3.0], **flags)
        assert_same(m.merge(name, [a, b], base=base if use_base else None), theirs, name)


def test_karcher_matches_mergekit(llamas):
    """Equal to mergekit's karcher (equal weights, its defaults max_iter 10, tol 1e-5) over three experts."""
    m = ours("karcher", {}, llamas)
    for name, (_, *experts) in llamas.items():
        assert_same(m.merge(name, experts), mergekit("karcher", experts, None), name)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_mergekit(llamas, filter_wise):
    """Equal to mergekit's model_stock over a base and three experts."""
    m = ours("model_stock", {"filter_wise": filter_wise}, llamas)
    for name, (base, *experts) in llamas.items():
        assert_same(m.merge(name, experts, base=base), mergekit("model_stock", [base, *experts], filter_wise=filter_wise), name)


@pytest.mark.parametrize("select_topk", [1.0, 0.3])
def test_sce_matches_mergekit(llamas, select_topk):
    """Equal to mergekit's sce over a base and three experts, with and without the variance selection."""
    m = ours("sce", {"select_topk": select_topk}, llamas)
    for name, (base, *experts) in llamas.items():
        assert_same(m.merge(name, experts, base=base), mergekit("sce", [base, *experts], select_topk=select_topk), name)
