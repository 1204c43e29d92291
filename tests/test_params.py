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
        ("alpha: 1.5\n", r"alpha: Input should be less than or equal to 1"),
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
