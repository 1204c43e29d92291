"""A merge method from an installed package's entry point (group `mergeflow.methods`), as a
package built by someone else registers one: a real distribution on sys.path, no mocks."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import ROOT, state
from mergeflow.merge import merge_models
from mergeflow.methods import ENTRY_POINT_GROUP, get_method

PLUGIN = textwrap.dedent(
    '''
    import torch
    from mergeflow.methods.base import MergeMethod

    class Maximum(MergeMethod):
        name = "elementwise_max"

        def merge(self, name, tensors, *, grams=None, base=None):
            return torch.stack([t.float() for t in tensors]).amax(dim=0)
    '''
)


def install_plugin(site, monkeypatch, entry: str = "elementwise_max", module: str = "mergeflow_max_plugin", source: str = PLUGIN) -> None:
    """What `pip install` of a package declaring the entry point leaves in site-packages."""
    site.mkdir()
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry} = {module}:Maximum\n")
    monkeypatch.syspath_prepend(str(site))


def test_entry_point_method_is_found_and_merges(experts, tmp_path, monkeypatch):
    install_plugin(tmp_path / "site", monkeypatch)
    cls = get_method("elementwise_max")
    assert (cls.__name__, cls.__module__) == ("Maximum", "mergeflow_max_plugin")
    merge_models(experts, cls(), tmp_path / "out")
    merged, a, b = state(tmp_path / "out"), state(experts[0]), state(experts[1])
    assert merged.keys() == a.keys()
    for name in a:
        assert torch.equal(merged[name], torch.maximum(a[name], b[name])), name


def test_an_entry_point_that_is_no_merge_method_is_refused(tmp_path, monkeypatch):
    install_plugin(tmp_path / "site", monkeypatch, "not_a_method", "mergeflow_not_a_method", "class Maximum:\n    pass\n")
    with pytest.raises(ValueError) as err:
        get_method("not_a_method")
    assert str(err.value) == (
        "entry point not_a_method = mergeflow_not_a_method:Maximum (group mergeflow.methods) is not a subclass of "
        "mergeflow.methods.base.MergeMethod (method: not_a_method)"
    )


def test_the_merge_stage_names_the_params_key_of_an_unknown_method(tmp_path):
    """The library's message has no params key; the stage adds it (the CLI adds --method)."""
    params = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(re.sub(r"(?m)^method: .*$", "method: frankenmerge", params))
    proc = subprocess.run(
        [sys.executable, ROOT / "stages" / "merge.py", "--params", tmp_path / "params.yaml", "--experts", tmp_path, "--grams", tmp_path,
         "--base", tmp_path, "--out", tmp_path / "m", "--dvc-yaml", ROOT / "dvc.yaml"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("or path/to/file.py:ClassName. (params.yaml: method)"), proc.stderr
