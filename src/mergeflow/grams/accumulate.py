"""Accumulating `sum x x^T` of Linear inputs with forward pre-hooks, once per distinct input.

Exact: only non-padding tokens are added, in float32 (or float64) whatever the model's dtype.
Fast: modules fed the very same tensor (q/k/v, gate/up) are accumulated once and share one key;
the product is symmetric, so for wide inputs only the upper triangle is computed, in row panels
(each one GEMM), and mirrored when the sums are read: about half the FLOPs of `X^T X`.
A pass may hook only some layers (`max_gram_memory`); the forward then stops after the last
hooked module instead of running the rest of the model for nothing.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

PANEL = 128  # inputs narrower than 2 panels are multiplied whole


class StopForward(Exception):
    """Raised after the last hooked module of a pass: the rest of the forward is not needed."""


def panel_bounds(n: int) -> list[tuple[int, int]]:
    """Row panels of the upper triangle: 1 (plain product) to 8 (about 56% of the full FLOPs)."""
    parts = max(1, min(8, n // PANEL))
    size = -(-n // parts)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def add_gram(upper: torch.Tensor, rows: torch.Tensor) -> None:
    """`upper += rows^T rows` on and above the diagonal (below it only when a panel spans it)."""
    for start, end in panel_bounds(rows.shape[1]):
        upper[start:end, start:].addmm_(rows[:, start:end].T, rows[:, start:])


def symmetric(upper: torch.Tensor) -> torch.Tensor:
    """The full matrix from what `add_gram` accumulated (its upper triangle is exact)."""
    full = torch.triu(upper)
    return full.add_(torch.triu(upper, 1).T)


SUM_SUFFIX = ".input_sum"  # key of a distinct input's token sum, stored beside its gram (biases)


class GramAccumulator:
    """Hooks on `linears` that add each batch's non-padding inputs' products into its sums.

    `keys` maps every hooked module to the module whose input it shares (itself when first), as
    `probe_inputs` learnt it; every batch must agree. The accumulator owns its sums: one `[in, in]`
    upper triangle per distinct input (zeros on `device`, or on the model's device when None), plus
    the `[in]` sum of the inputs themselves for the keys in `with_input_sum` (Linears with a bias:
    `regmean_bias: solve` needs them). `state` and `restore` checkpoint them; `result` is what a
    gram file stores.
    """

    def __init__(
        self, linears: dict[str, nn.Module], keys: dict[str, str], in_features: dict[str, int], *,
        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", with_input_sum: tuple[str, ...] = (), stop_after: Optional[str] = None,
    ):
        self.keys = dict(keys)
        self.dtype = dtype
        self.num_tokens = 0
        owners = sorted(set(self.keys.values()))
        self._sums = {k: torch.zeros(in_features[k], in_features[k], dtype=dtype, device=device) for k in owners}
        self._totals = {k: torch.zeros(in_features[k], dtype=dtype, device=device) for k in owners if k in with_input_sum}
        self._mask: Optional[torch.Tensor] = None
        self._unpadded = False
        self._tracker = InputTracker()
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items()]
        if stop_after is not None:
            self._handles.append(linears[stop_after].register_forward_hook(_stop))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            owner = self._tracker.owner(x, name)
            if owner != self.keys[name]:
                raise RuntimeError(f"{name}: shares its input with {owner} in this batch but not in the first one")
            if owner != name:
                return
            rows = x.reshape(-1, x.shape[-1])
            if not self._unpadded:  # boolean indexing copies: skip it when no token is padding
                rows = rows[self._mask]
            upper = self._sums[name]
            rows = rows.to(device=upper.device, dtype=self.dtype)
            add_gram(upper, rows)
            if name in self._totals:
                self._totals[name].add_(rows.sum(0))

        return hook

    def forward(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Run one batch and add its non-padding tokens' inputs."""
        mask = attention_mask.reshape(-1).bool()
        self._mask, self._unpadded = mask, bool(mask.all())
        run_causal(model, input_ids, attention_mask, self._tracker)
        self.num_tokens += int(mask.sum())

    def state(self) -> dict[str, torch.Tensor]:
        """The partial sums as tensors by name (checkpoints, all-reduce); `restore` reads them back."""
        return {**self._sums, **{k + SUM_SUFFIX: t for k, t in self._totals.items()}}

    def restore(self, num_tokens: int, saved: dict[str, torch.Tensor]) -> None:
        self.num_tokens = num_tokens
        state = self.state()
        for name, value in saved.items():
            state[name].copy_(value)

    def result(self) -> dict[str, torch.Tensor]:
        """Full symmetric grams (and input sums) on the CPU, by stored key."""
        out = {k: symmetric(t).cpu() for k, t in self._sums.items()}
        out.update({k + SUM_SUFFIX: t.cpu() for k, t in self._totals.items()})
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _stop(module, args, output):
    raise StopForward


class InputTracker:
    """Tells which hooked module first saw a tensor in the current forward pass: modules fed the
    very same tensor (q/k/v, gate/up) share one gram."""

    def __init__(self):
        self._seen: dict[int, tuple[weakref.ref, str]] = {}

    def owner(self, x: torch.Tensor, name: str) -> str:
        ref, owner = self._seen.get(id(x), (None, None))
        if ref is None or ref() is not x:  # a new input (ids of freed tensors get reused)
            owner = name
            self._seen[id(x)] = (weakref.ref(x), name)
        return owner

    def reset(self) -> None:
        self._seen = {}


def run_causal(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, tracker: InputTracker) -> None:
    """One forward pass of a decoder, stopped early by `StopForward`; left padding keeps real positions."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    tracker.reset()
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    except StopForward:
        pass
    finally:
        tracker.reset()


def probe_inputs(model: nn.Module, linears: dict[str, nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[dict[str, str], list[str]]:
    """Run one small batch to learn which modules share an input (module -> the first module fed
    it) and the order the modules run in; modules the forward never reaches are left out."""
    tracker, keys = InputTracker(), {}

    def hook_for(name):
        def hook(module, args):
            keys.setdefault(name, tracker.owner(args[0], name))
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in linears.items()]
    try:
        run_causal(model, input_ids, attention_mask, tracker)
    finally:
        for handle in handles:
            handle.remove()
    return keys, list(keys)
