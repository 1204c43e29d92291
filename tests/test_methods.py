"""Merge methods on small tensors computed by hand, weights, and user plugins."""

from __future__ import annotations

import textwrap

import pytest
import torch

from mergeflow.merge import merge_models
from mergeflow.methods import get_method

from helpers import state

BASE = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
A = torch.tensor([[2.0, 0.0, 1.5, 1.0]])  # task vector [ 1, -1,  0.5, 0]
B = torch.tensor([[3.0, 2.5, 0.0, 1.0]])  # task vector [ 2,  1.5, -1, 0]


def test_task_arithmetic_by_hand():
    m = get_method("task_arithmetic")({"scaling": 0.5})
    # base + 0.5 * ([1, -1, 0.5, 0] + [2, 1.5, -1, 0]) = base + [1.5, 0.25, -0.25, 0]
    torch.testing.assert_close(m.merge("w", [A, B], base=BASE), torch.tensor([[2.5, 1.25, 0.75, 1.0]]))


def test_ties_by_hand():
    m = get_method("ties")({"density": 0.5, "scaling": 1.0})
    # trim to the top 2 magnitudes: A -> [1, -1, 0, 0], B -> [2, 1.5, 0, 0]
    # elected signs of the sum [3, 0.5, 0, 0]: [+, +, 0, 0]
    # means of the agreeing entries: [(1 + 2) / 2, 1.5 (B only), 0, 0]
    torch.testing.assert_close(m.merge("w", [A, B], base=BASE), torch.tensor([[2.5, 2.5, 1.0, 1.0]]))


def test_ties_disagreeing_signs_keep_the_majority_mass():
    m = get_method("ties")({"density": 1.0})
    # task vectors [1, -1, 0.5, 0] and [2, 1.5, -1, 0]: signs of the sum [3, 0.5, -0.5, 0] -> [+, +, -, 0]
    # agreeing means: [1.5, 1.5 (B), -1 (B), 0]
    torch.testing.assert_close(m.merge("w", [A, B], base=BASE), torch.tensor([[2.5, 2.5, 0.0, 1.0]]))


def test_weighted_average_and_regmean():
    avg = get_method("average")({"weights": [3.0, 1.0]})
    torch.testing.assert_close(avg.merge("w", [A, B]), 0.75 * A + 0.25 * B)
    g1, g2 = torch.eye(4) * 2, torch.eye(4)
    rm = get_method("regmean")({"alpha": 1.0, "weights": [0.8, 0.2]})
    # diagonal grams: column j = (0.8 * 2 * A + 0.2 * 1 * B) / (0.8 * 2 + 0.2 * 1)
    torch.testing.assert_close(rm.merge("w", [A, B], grams=[g1.clone, g2.clone]), (1.6 * A + 0.2 * B) / 1.8)


def test_regmean_alpha0_with_equal_diagonals_is_averaging():
    torch.manual_seed(0)
    x = torch.randn(50, 4)
    g = x.T @ x / 50
    d = torch.diag(torch.diagonal(g))
    other = g.clone()
    other[0, 1] = other[1, 0] = 7.0  # different off-diagonals, same diagonal
    rm = get_method("regmean")({"alpha": 0.0})
    torch.testing.assert_close(rm.merge("w", [A, B], grams=[g.clone, other.clone]), (A + B) / 2)
    assert torch.equal(torch.diagonal(other), torch.diagonal(d))


@pytest.mark.parametrize(
    ("method", "values", "message"),
    [
        ("regmean", {"alpha": -0.1}, "regmean: alpha must be in [0, 1], got -0.1"),
        ("regmean", {"alpha": 1.5}, "regmean: alpha must be in [0, 1], got 1.5"),
        ("regmean", {"alpha": True}, "regmean: alpha must be a float, got True"),
        ("regmean", {"alpha": "0.3"}, "regmean: alpha must be a float, got '0.3'"),
        ("regmean", {"alpha": [0.1, 2]}, "regmean: alpha[1] must be in [0, 1], got 2.0"),
        ("regmean", {"alpha": {"mlp": 1.5}}, "regmean: alpha['mlp'] must be in [0, 1], got 1.5"),
        ("regmean", {"alpha": []}, "regmean: alpha is an empty per-layer list; give at least one value"),
        ("regmean", {"solver_dtype": "float16"}, "regmean: solver_dtype must be one of float32, float64, got 'float16'"),
        ("regmean", {"solver_dtype": ["float32"]}, "regmean: solver_dtype must be a str, got ['float32']"),
        ("regmean", {"density": 0.5}, "regmean: unknown parameter 'density'; regmean reads alpha, weights, solver_dtype"),
        ("ties", {"density": 0.0}, "ties: density must be in (0, 1], got 0.0"),
        ("average", {"weights": [1.0, -1.0]}, "average: weights[1] must be >= 0, got -1.0"),
        ("average", {"weights": [0, 0]}, "average: weights must have a positive sum, got [0.0, 0.0]"),
        ("average", {"weights": 0.5}, "average: weights must be a list with one value per expert, got 0.5"),
    ],
)
def test_bad_values_are_one_line_naming_the_param(method, values, message):
    with pytest.raises(ValueError) as err:
        get_method(method)(values)
    assert str(err.value) == message


def test_weights_must_match_the_experts():
    with pytest.raises(ValueError, match=r"^average: weights has 3 values for 2 experts"):
        get_method("average")({"weights": [1.0, 1.0, 1.0]}).merge("w", [A, B])


def test_a_wrong_length_per_expert_list_is_refused_before_anything_is_written(experts, tmp_path):
    with pytest.raises(ValueError, match=r"^average: weights has 3 values for 2 experts; give one per expert, in their order$"):
        merge_models(experts, get_method("average")({"weights": [1.0, 2.0, 3.0]}), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


PLUGIN = textwrap.dedent(
    '''
    """A user's own method, competition style: a class with __init__ and merge."""
    import torch
    from mergeflow.methods.base import MergeMethod

    class Maximum(MergeMethod):
        name = "maximum"

        def merge(self, name, tensors, *, grams=None, base=None):
            return torch.stack([t.float() for t in tensors]).amax(dim=0)
    '''
)


def test_plugin_method_from_a_file(experts, tmp_path):
    plugin = tmp_path / "my_merge.py"
    plugin.write_text(PLUGIN)
    method = get_method(f"{plugin}:Maximum")()
    merge_models(experts, method, tmp_path / "out")
    merged, a, b = state(tmp_path / "out"), state(experts[0]), state(experts[1])
    for name in a:
        assert torch.equal(merged[name], torch.maximum(a[name], b[name]))


def test_plugin_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.py: merge method plugin file not found"):
        get_method(f"{tmp_path}/nope.py:X")
    (tmp_path / "p.py").write_text("class NotAMethod: pass\n")
    with pytest.raises(ValueError, match=r"'NotAMethod' is not a subclass of mergeflow\.methods\.base\.MergeMethod"):
        get_method(f"{tmp_path}/p.py:NotAMethod")
