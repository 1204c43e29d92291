"""params.yaml validation: the repository's own file, and clear errors for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeflow.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def test_repository_params_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.method == "regmean" and 0 <= p.alpha <= 1 and p.models.source == "toy"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alpha: 1.5\n", r"\n  alpha must be in \[0, 1\], got 1\.5$"),
        ("alpha: [0.1, 1.5]\n", r"\n  alpha\[1\] must be in \[0, 1\], got 1\.5$"),
        ("merge:\n  densty: 0.3\n", r"\n  merge\.densty: unknown key; the merge methods read alpha \(top level\), density, scaling, solver_dtype, weights; "
                                     r"the engine reads merge\.regmean_lm_head, merge\.device, merge\.max_shard_size, merge\.check_magnitude$"),
        ("merge:\n  density: 0\n", r"\n  merge\.density must be in \(0, 1\], got 0\.0$"),
        ("merge:\n  weights: [1, 2, 3]\n", r"\n  merge\.weights has 3 values for 2 experts; give one per expert, in the order of `experts`$"),
        ("merge:\n  alpha: 0.3\n", r"\n  merge\.alpha: alpha is a top-level key \(dvc exp run -S alpha=\.\.\.\); move it out of merge$"),
        ("gram:\n  max_lenght: 3\n", r"gram\.max_lenght: Extra inputs are not permitted"),
        ("gram:\n  max_length: 0\n", r"gram\.max_length: Input should be greater than or equal to 1"),
        ("models:\n  source: s3\n", r"models\.source: Input should be 'toy', 'smollm2', 'hub' or 'local'"),
        ("experts: [math, math]\n", r"experts must be distinct"),
    ],
)
def test_bad_params_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_params(path)
    assert str(path) in str(err.value)


def test_missing_params_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such params file"):
        load_params(tmp_path / "params.yaml")
