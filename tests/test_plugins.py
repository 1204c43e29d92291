"""A merge method from an installed package's entry point (group `mergeflow.methods`), as a
package built by someone else registers one: a real distribution on sys.path, no mocks."""

from __future__ import annotations

import textwrap

import torch

from helpers import state
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


def install_plugin(site, monkeypatch) -> None:
    """What `pip install` of a package declaring the entry point leaves in site-packages."""
    site.mkdir()
    (site / "mergeflow_max_plugin.py").write_text(PLUGIN)
    info = site / "mergeflow_max_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mergeflow-max-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nelementwise_max = mergeflow_max_plugin:Maximum\n")
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
