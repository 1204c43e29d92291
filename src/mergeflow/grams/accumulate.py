"""Accumulating `sum x x^T` of Linear inputs with forward pre-hooks, once per distinct input.

Exact: only non-padding tokens are added, in float32 (or float64) whatever the model's dtype.
Fast: modules fed the very same tensor (q/k/v, gate/up) are accumulated once and share one key;
the product is symmetric, so for wide inputs only the upper triangle is computed, in row panels
(each one GEMM), and mirrored when the sums are read: about half the FLOPs of `X^T X`.
A pass may hook only some layers (`max_gram_memory`); the forward then stops after the last
hooked module instead of running the rest of the model for nothing.
Encoder-decoders have two token streams, each with its own padding mask: a module's stream is
learnt by the probe from the number of tokens its input holds (the probe batch gives the encoder
and the decoder different lengths), so cross-attention k/v, fed encoder outputs, take the
encoder's mask and every other decoder module the decoder's.
Experts of a mixture-of-experts block fused into 3-D parameters are hooked once per block
(`moe.ExpertSlot`): each expert's gram covers the tokens routed to it.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from .moe import ExpertSlot, expert_inputs, slot_blocks

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

    `keys` maps every hooked module to the module whose input it shares (itself when first), and
    `streams` to the token stream its input belongs to (a key of `forward_batch`'s masks; a single
    stream needs none), as `probe` learnt them; every batch must agree. The accumulator owns its sums: one `[in, in]`
    upper triangle per distinct input (zeros on `device`, or on the model's device when None), plus
    the `[in]` sum of the inputs themselves for the keys in `with_input_sum` (Linears with a bias:
    `regmean_bias: solve` needs them). `state` and `restore` checkpoint them; `result` is what a
    gram file stores.
    """

    def __init__(
        self, linears: dict[str, nn.Module], keys: dict[str, str], in_features: dict[str, int], *,
        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", with_input_sum: tuple[str, ...] = (), stop_after: Optional[str] = None,
        streams: Optional[dict[str, str]] = None,
    ):
        self.keys = dict(keys)
        self.streams = dict(streams or {})
        self.dtype = dtype
        self.num_tokens = 0
        owners = sorted(set(self.keys.values()))
        self._sums = {k: torch.zeros(in_features[k], in_features[k], dtype=dtype, device=device) for k in owners}
        self._totals = {k: torch.zeros(in_features[k], dtype=dtype, device=device) for k in owners if k in with_input_sum}
        self._masks: dict[str, torch.Tensor] = {}
        self._unpadded: dict[str, bool] = {}
        self._tracker = InputTracker()
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items() if not isinstance(m, ExpertSlot)]
        self._handles += [experts.register_forward_pre_hook(self._experts_hook(slots)) for experts, slots in slot_blocks(linears)]
        if stop_after is not None:
            last = linears[stop_after]
            self._handles.append((last.experts if isinstance(last, ExpertSlot) else last).register_forward_hook(_stop))

    def _stream(self, name: str, x: torch.Tensor) -> str:
        if name in self.streams:
            return self.streams[name]
        return next(iter(self._masks)) if len(self._masks) == 1 else stream_of(name, x, self._masks)

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            owner = self._tracker.owner(x, name)
            if owner != self.keys[name]:
                raise RuntimeError(f"{name}: shares its input with {owner} in this batch but not in the first one")
            if owner != name:
                return
            rows = x.reshape(-1, x.shape[-1])
            stream = self._stream(name, x)
            if not self._unpadded[stream]:  # boolean indexing copies: skip it when no token is padding
                rows = rows[self._masks[stream]]
            self._add(name, rows)

        return hook

    def _add(self, owner: str, rows: torch.Tensor) -> None:
        upper = self._sums[owner]
        rows = rows.to(device=upper.device, dtype=self.dtype)
        add_gram(upper, rows)
        if owner in self._totals:
            self._totals[owner].add_(rows.sum(0))

    def _experts_hook(self, slots: dict[str, ExpertSlot]):
        """One fused experts module: each slot that owns its key (expert e's gate, whose key its up
        shares; its down) gets the rows `expert_inputs` gives for it."""
        def hook(module: nn.Module, args: tuple) -> None:
            hidden, routed_to = args[0], args[1]
            stream = self._stream(next(iter(slots)), hidden)
            mask = None if self._unpadded[stream] else self._masks[stream]
            wanted = {(slot.index, slot.kind): name for name, slot in slots.items() if self.keys[name] == name}
            for key, rows in expert_inputs(module, hidden, routed_to, mask, set(wanted)):
                self._add(wanted[key], rows)

        return hook

    def forward(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Run one batch of a decoder-only model and add its non-padding tokens' inputs."""
        self.forward_batch(model, causal_inputs(input_ids, attention_mask), {"tokens": attention_mask})

    def forward_batch(self, model: nn.Module, inputs: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
        """Run `model(**inputs)` and add the non-padding tokens' inputs, each module's masked by its
        stream's mask in `masks`; the first stream's tokens are counted."""
        self._masks = {stream: mask.reshape(-1).bool() for stream, mask in masks.items()}
        self._unpadded = {stream: bool(mask.all()) for stream, mask in self._masks.items()}
        run_model(model, inputs, self._tracker)
        self.num_tokens += int(next(iter(self._masks.values())).sum())

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


def causal_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """A decoder's forward arguments; left padding keeps real positions."""
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": (attention_mask.cumsum(-1) - 1).clamp_min(0)}


def run_model(model: nn.Module, inputs: dict[str, torch.Tensor], tracker: InputTracker) -> None:
    """One forward pass, stopped early by `StopForward`."""
    tracker.reset()
    try:
        model(**inputs, use_cache=False)
    except StopForward:
        pass
    finally:
        tracker.reset()


def run_causal(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, tracker: InputTracker) -> None:
    """One forward pass of a decoder, stopped early by `StopForward`; left padding keeps real positions."""
    run_model(model, causal_inputs(input_ids, attention_mask), tracker)


def stream_of(name: str, x: torch.Tensor, masks: dict[str, torch.Tensor]) -> str:
    """The stream whose token count `x` holds; it must be the only one (a probe makes sure)."""
    tokens = x.numel() // x.shape[-1]
    matches = [stream for stream, mask in masks.items() if mask.numel() == tokens]
    if len(matches) != 1:
        raise RuntimeError(f"{name}: its input of {tokens} tokens matches streams {matches} of {sorted(masks)}; "
                           "probe with a batch whose streams differ in length")
    return matches[0]


def probe(model: nn.Module, linears: dict[str, nn.Module], inputs: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """Run one small batch to learn which modules share an input (module -> the first module fed
    it), the order the modules run in, and each module's token stream (a key of `masks`); modules
    the forward never reaches are left out. Expert slots of one fused block share keys as
    `moe.slot_blocks` pairs them."""
    tracker, keys, streams = InputTracker(), {}, {}

    def hook_for(name):
        def hook(module, args):
            keys.setdefault(name, tracker.owner(args[0], name))
            streams.setdefault(name, stream_of(name, args[0], masks))
        return hook

    def experts_hook(slots):
        def hook(module, args):
            owners: dict[tuple[int, str], str] = {}
            for name, slot in slots.items():
                keys.setdefault(name, owners.setdefault((slot.index, slot.kind), name))
                streams.setdefault(name, stream_of(name, args[0], masks))
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in linears.items() if not isinstance(m, ExpertSlot)]
    handles += [experts.register_forward_pre_hook(experts_hook(slots)) for experts, slots in slot_blocks(linears)]
    try:
        run_model(model, inputs, tracker)
    finally:
        for handle in handles:
            handle.remove()
    return keys, list(keys), streams


def probe_inputs(model: nn.Module, linears: dict[str, nn.Module], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[dict[str, str], list[str]]:
    """`probe` of a decoder-only model on `input_ids`: (keys, order)."""
    keys, order, _ = probe(model, linears, causal_inputs(input_ids, attention_mask), {"tokens": attention_mask})
    return keys, order
