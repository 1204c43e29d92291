"""mergekit's data-free methods on small tensors computed by hand, the properties mergekit does
not define (seeded reproducibility, TIES's two conventions side by side, closed forms), and every
method through the engine on tiny Llamas (per-layer values, the errors for bad input)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mergeflow.merge import merge_models
from mergeflow.methods import get_method
from mergeflow.methods import sparsify as sp
from mergeflow.methods.karcher import karcher_mean
from mergeflow.methods.model_stock import model_stock
from mergeflow.methods.nuslerp import nuslerp
from mergeflow.methods.sce import sce
from mergeflow.methods.slerp import slerp

from helpers import make_tiny_llama, state


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
    """Property mergekit does not define (its DARE draws from the global generator): same (seed,
    tensor name), the same bytes; another name or seed, another mask; about `density` kept."""
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
    """Hand-made input: density 0.5 +/- epsilon 0.6 leaves (0, 1); one line naming both."""
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


def test_ties_conventions_side_by_side():
    """Hand-computed, the tensors of the first test through `ties`: mergeflow's convention keeps
    ceil(2.4) = 3 entries of the weighted task vectors [3, -6, 1.2, 9] and [-1, 1.5, 0.2, 3]:
    [3, -6, 0, 9] and [-1, 1.5, 0, 3]; signs of the sum [2, -4.5, 0, 12] -> [+, -, 0, +];
    means of the agreeing entries [3, -6, 0, (9 + 3) / 2]. mergekit's: [0, -2, 0, 3] (above)."""
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, -2.0, 0.4, 3.0]), torch.tensor([-1.0, 1.5, 0.2, 3.0])
    values = {"weights": [3.0, 1.0], "density": 0.6}
    assert get_method("ties")(values).merge("w", [a, b], base=base).tolist() == [3.0, -6.0, 0.0, 6.0]
    assert get_method("ties")({**values, "convention": "mergekit"}).merge("w", [a, b], base=base).tolist() == [0.0, -2.0, 0.0, 3.0]
    tie = [torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 1.0])]  # exact sign tie in the first entry
    assert get_method("ties")({"density": 1.0}).merge("w", tie, base=torch.zeros(2)).tolist() == [0.0, 1.5]
    assert get_method("ties")({"density": 1.0, "convention": "mergekit"}).merge("w", tie, base=torch.zeros(2)).tolist() == [1.0, 1.5]


# --- through the engine, on tiny Llamas ---------------------------------------------------------

NEW_METHODS = {
    "slerp": {"t": 0.3},
    "nuslerp": {"weights": [1.0, 2.0], "use_base": True},
    "karcher": {"weights": [1.0, 3.0]},
    "model_stock": {"filter_wise": True},
    "sce": {"select_topk": 0.5},
    "dare_linear": {"density": 0.5, "seed": 1},
    "dare_ties": {"density": 0.5},
    "della": {"density": 0.5, "epsilon": 0.2},
    "della_linear": {"density": 0.5},
    "breadcrumbs": {"density": 0.5, "gamma": 0.1},
    "breadcrumbs_ties": {"density": 0.5},
    "ties": {"convention": "mergekit", "density": 0.5},
}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("df") / "base", seed=10)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_engine_merges_each_method(experts, base_model, tmp_path, method):
    """The engine's merged model holds, tensor by tensor, what the method computes on the whole
    tensors (and the base where it reads one); the merge config records every declared param."""
    m = get_method(method)(NEW_METHODS[method])
    config = merge_models(experts, m, tmp_path / "out", base=base_model)
    merged, inputs, base = state(tmp_path / "out"), [state(e) for e in experts], state(base_model)
    direct = get_method(method)(NEW_METHODS[method])
    direct.prepare(list(merged), num_experts=2)
    for name, tensor in merged.items():
        expected = direct.merge(name, [x[name] for x in inputs], base=base[name] if m.uses_base else None)
        assert torch.equal(tensor, expected.to(tensor.dtype)), name
    saved = json.loads((tmp_path / "out" / "mergeflow_merge.json").read_text())
    assert saved["method"] == method and config["method"] == method
    assert {p.name for p in m.params} <= set(saved)


def test_random_methods_are_reproducible_byte_for_byte(experts, base_model, tmp_path):
    """dare_ties and della twice with one seed: the same safetensors bytes; another seed: others."""
    for method in ("dare_ties", "della"):
        runs = {}
        for run, seed in (("a", 5), ("b", 5), ("c", 6)):
            merge_models(experts, get_method(method)({"density": 0.5, "seed": seed}), tmp_path / method / run, base=base_model)
            runs[run] = b"".join(p.read_bytes() for p in sorted((tmp_path / method / run).glob("*.safetensors")))
        assert runs["a"] == runs["b"], method
        assert runs["a"] != runs["c"], method


def test_per_module_mapping_through_the_engine(experts, tmp_path):
    """slerp with t = {self_attn: 0.2, mlp: 0.9, "*": 0.5}: attention tensors at 0.2, MLP ones at
    0.9, the rest (embeddings, norms, lm_head) at 0.5."""
    merge_models(experts, get_method("slerp")({"t": {"self_attn": 0.2, "mlp": 0.9, "*": 0.5}}), tmp_path / "out")
    merged, (a, b) = state(tmp_path / "out"), [state(e) for e in experts]
    for name, tensor in merged.items():
        t = 0.2 if "self_attn" in name else 0.9 if "mlp" in name else 0.5
        assert torch.equal(tensor, slerp(t, a[name], b[name])), name


def test_slerp_refuses_three_experts_writing_nothing(experts, base_model, tmp_path):
    """Bad input through the engine: one line, and no output directory."""
    with pytest.raises(ValueError, match=r"^slerp interpolates exactly two experts, got 3; for more use karcher \(their spherical mean\) or another method$"):
        merge_models([*experts, base_model], get_method("slerp")(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_della_band_outside_0_1_is_one_line_and_writes_nothing(experts, base_model, tmp_path):
    """density 0.1 - epsilon 0.15 < 0: refused before the first tensor."""
    with pytest.raises(ValueError, match=r"^della: density \+/- epsilon must lie in \(0, 1\), got density 0.1 and epsilon 0.15 for lm_head.weight$"):
        merge_models(experts, get_method("della")({"density": 0.1}), tmp_path / "out", base=base_model)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["model_stock", "sce", "dare_linear", "dare_ties", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties"])
def test_methods_needing_a_base_refuse_none(experts, tmp_path, method):
    """Bad input through the engine (uses_base, no --base): one line, and no output directory."""
    with pytest.raises(ValueError, match=rf"^method '{method}' needs the base model the experts were fine-tuned from"):
        merge_models(experts, get_method(method)(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("method", "values", "message"),
    [
        ("dare_ties", {"lambda": 0.5}, r"^dare_ties: unknown parameter 'lambda'; dare_ties reads weights, scaling, density, normalize, rescale, seed$"),
        ("della", {"epsilon": 1.0}, r"^della: epsilon must be in \[0, 1\), got 1.0$"),
        ("slerp", {"t": [0.2, 1.5]}, r"^slerp: t\[1\] must be in \[0, 1\], got 1.5$"),
        ("ties", {"convention": "paper"}, r"^ties: convention must be one of mergeflow, mergekit, got 'paper'$"),
    ],
)
def test_bad_values_are_one_line(method, values, message):
    """Bad values, checked against each method's declared params: one line each (mergekit's
    `lambda` is our `scaling`, so it is an unknown name here)."""
    with pytest.raises(ValueError, match=message):
        get_method(method)(values)


def test_kernels_do_not_depend_on_the_thread_count():
    """ATen splits a reduction to one number by thread count (a sum of 3M floats differs in its last
    bits between 1, 2 and 3 threads); every kernel's output is the same bytes at 1 and 3 threads."""
    g = torch.Generator().manual_seed(0)
    base, a, b, c = (torch.randn(1500, 1000, generator=g) for _ in range(4))
    kernels = {
        "slerp": lambda: slerp(0.3, a, b),
        "nuslerp": lambda: nuslerp(0.3, a, b),
        "karcher": lambda: karcher_mean([a, b, c], [0.2, 0.3, 0.5]),
        "model_stock": lambda: model_stock(base, [a, b, c]),
        "sce": lambda: sce(base, [a, b, c], select_topk=0.5),
        "dare rescale": lambda: sp.bernoulli(a, 0.3, torch.Generator().manual_seed(1), rescale=True),
    }
    threads = torch.get_num_threads()
    try:
        outputs = []
        for n in (1, 3):
            torch.set_num_threads(n)
            outputs.append({name: f() for name, f in kernels.items()})
    finally:
        torch.set_num_threads(threads)
    for name in kernels:
        assert torch.equal(outputs[0][name], outputs[1][name]), name


def test_tied_embeddings_stay_tied_under_a_random_method(tmp_path):
    """dare_ties on tied tiny Llamas: the one stored embedding gets one mask, and the merged model
    is tied with equal input and output embeddings."""
    from transformers import AutoModelForCausalLM

    base, a, b = (make_tiny_llama(tmp_path / f"m{i}", seed=20 + i, tie=True) for i in range(3))
    merge_models([a, b], get_method("dare_ties")({"density": 0.5}), tmp_path / "out", base=base)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.config.tie_word_embeddings
    assert torch.equal(merged.get_input_embeddings().weight, merged.get_output_embeddings().weight)
    assert "lm_head.weight" not in state(tmp_path / "out")
