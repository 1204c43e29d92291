"""Accumulating `sum x x^T` of Linear inputs with forward pre-hooks, once per distinct input.

Exact: only non-padding tokens are added, in float32 (or float64) whatever the model's dtype.
Fast: modules fed the very same tensor (q/k/v, gate/up) are accumulated once and share one key;
the product is symmetric, so for wide inputs only the upper triangle is computed, in row panels
(each one GEMM), and mirrored when the sums are read: about half the FLOPs of `X^T X`.
A pass may hook only some layers (`max_gram_memory`); the forward then stops after the last
hooked module instead of running the rest of the model for nothing.
Encoder-decoders have two token streams, each with its own padding mask: a module's stream is
learnt from the number of tokens its input holds (a probe batch gives the encoder and the decoder
different lengths), so cross-attention k/v, fed encoder outputs, take the encoder's mask and
every other decoder module the decoder's.
Experts of a mixture-of-experts block fused into 3-D parameters are hooked once per block
(`moe.ExpertSlot`): each expert's gram covers the tokens routed to it.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from .moe import ExpertSlot, expert_inputs

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


class GramAccumulator:
    """Hooks on `linears` that add each batch's non-padding inputs' products into sums.

    `keys` maps every hooked module to the module whose input it shares (itself when first); it
    is learnt from the first batch and must hold for every later one. `order` is the modules'
    execution order.
    """

    def __init__(self, linears: dict[str, nn.Linear], *, dtype: torch.dtype = torch.float32, device: Optional[str] = None, stop_after: Optional[str] = None):
        self.linears = linears
        self.dtype, self.device = dtype, device
        self.sums: dict[str, torch.Tensor] = {}
        self.keys: dict[str, str] = {}
        self.order: list[str] = []
        self.num_tokens = 0
        self.streams: dict[str, str] = {}  # module -> the stream (key of `forward_batch`'s masks) its input belongs to
        self._masks: dict[str, torch.Tensor] = {}
        self._accumulate = False
        self._unpadded: dict[str, bool] = {}
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in linears.items() if not isinstance(m, ExpertSlot)]
        blocks: dict[int, tuple[nn.Module, list[str]]] = {}
        for name, m in linears.items():
            if isinstance(m, ExpertSlot):
                blocks.setdefault(id(m.experts), (m.experts, []))[1].append(name)
        self._handles += [experts.register_forward_pre_hook(self._experts_hook(names)) for experts, names in blocks.values()]
        if stop_after is not None:
            target = linears[stop_after]
            self._handles.append((target.experts if isinstance(target, ExpertSlot) else target).register_forward_hook(self._stop))

    @staticmethod
    def _stop(module, args, output):
        raise StopForward

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            ref, owner = self._seen.get(id(x), (None, None))
            if ref is None or ref() is not x:  # a new input (ids of freed tensors get reused)
                owner = name
                self._seen[id(x)] = (weakref.ref(x), name)
            if name not in self.keys:
                self.order.append(name)
            known = self.keys.setdefault(name, owner)
            if known != owner:
                raise RuntimeError(f"{name}: shares its input with {owner} in this batch but not in the first one")
            stream = self.streams.get(name) or self._learn_stream(name, x)
            if owner != name or not self._accumulate:
                return
            rows = x.reshape(-1, x.shape[-1])
            if not self._unpadded[stream]:  # boolean indexing copies: skip it when no token is padding
                rows = rows[self._masks[stream]]
            self._add(name, rows)

        return hook

    def _add(self, owner: str, rows: torch.Tensor) -> None:
        device = self.device or rows.device
        rows = rows.to(device=device, dtype=self.dtype)
        if owner not in self.sums:
            self.sums[owner] = torch.zeros(rows.shape[-1], rows.shape[-1], dtype=self.dtype, device=device)
        add_gram(self.sums[owner], rows)

    def _experts_hook(self, names: list[str]):
        """One fused experts module's slots: expert e's gate/up share the inputs routed to e (one
        key, the first slot's name), its down projection the gated intermediate states."""
        slots = {name: self.linears[name] for name in sorted(names)}
        owners: dict[tuple[int, str], str] = {}
        for name, slot in slots.items():
            owners.setdefault((slot.index, slot.kind), name)

        def hook(module: nn.Module, args: tuple) -> None:
            hidden, routed_to = args[0], args[1]
            for name, slot in slots.items():
                if name not in self.keys:
                    self.order.append(name)
                self.keys.setdefault(name, owners[slot.index, slot.kind])
                stream = self.streams.get(name) or self._learn_stream(name, hidden)
            if not self._accumulate:
                return
            mask = None if self._unpadded[stream] else self._masks[stream]
            wanted = {key for key in owners if self.keys.get(owners[key]) == owners[key]}
            for (index, kind), rows in expert_inputs(module, hidden, routed_to, mask, wanted):
                self._add(owners[index, kind], rows)

        return hook

    def _learn_stream(self, name: str, x: torch.Tensor) -> str:
        """The stream whose token count `x` holds; it must be the only one (a probe makes sure)."""
        tokens = x.numel() // x.shape[-1]
        matches = [stream for stream, mask in self._masks.items() if mask.numel() == tokens]
        if len(matches) != 1:
            raise RuntimeError(f"{name}: its input of {tokens} tokens matches streams {matches} of {sorted(self._masks)}; "
                               "learn the streams from a probe batch whose streams differ in length")
        self.streams[name] = matches[0]
        return matches[0]

    def forward(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, accumulate: bool = True) -> None:
        """Run one batch of a decoder-only model; with `accumulate=False` only learn keys and order (a probe)."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # left padding keeps real positions
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        self.forward_batch(model, inputs, {"tokens": attention_mask}, accumulate=accumulate)

    def forward_batch(self, model: nn.Module, inputs: dict, masks: dict[str, torch.Tensor], *, accumulate: bool = True) -> None:
        """Run `model(**inputs)`, each hooked module's input masked by its stream's mask in `masks`
        (the first stream's tokens are counted); with `accumulate=False` only learn keys, order and
        streams (a probe)."""
        self._masks = {stream: mask.reshape(-1).bool() for stream, mask in masks.items()}
        self._unpadded = {stream: bool(mask.all()) for stream, mask in self._masks.items()}
        self._accumulate = accumulate
        self._seen = {}
        try:
            model(**inputs, use_cache=False)
        except StopForward:
            pass
        finally:
            self._seen = {}
            self._accumulate = False
        if accumulate:
            self.num_tokens += int(next(iter(self._masks.values())).sum())

    def full_sums(self) -> dict[str, torch.Tensor]:
        return {key: symmetric(upper) for key, upper in self.sums.items()}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
