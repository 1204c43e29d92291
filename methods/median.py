"""An example merge method plugin: the element-wise median of the experts (README, "Your own method").

Plugins of the DVC pipeline live in this folder, which the merge stage depends on, so editing one
reruns merge: `dvc exp run -S method=methods/median.py:Median`.
"""

import torch

from mergeflow.methods.base import MergeMethod


class Median(MergeMethod):
    """The element-wise median of the experts."""

    name = "median"
    params = ()  # the knobs it reads, as `Param`s (params.yaml `merge.<name>`, `--param NAME=VALUE`); saved with the model

    def merge(self, name, tensors, *, grams=None, base=None):
        # tensors: the experts' versions of one tensor (or one block of its rows), same shape
        return torch.stack([t.float() for t in tensors]).median(dim=0).values
