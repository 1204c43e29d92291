"""Padded batches of tokenised calibration rows, as the model's forward takes them.

A decoder-only model gets `input_ids`, `attention_mask` and the `position_ids` that keep left
padding out of the positions; one token stream, `tokens`. An encoder-decoder gets the encoder's
ids and mask and the decoder's teacher-forced ids and mask; two streams, `encoder` and
`decoder` (see `seq2seq.py`). `GramAccumulator.forward_batch` masks each module's input with its
stream's mask.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pad_batch(rows: Sequence[list[int]], pad: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, seq in enumerate(rows):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[r, span] = torch.tensor(seq)
        mask[r, span] = 1
    return ids, mask


Batch = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]  # (model inputs, stream -> mask)


class CausalBatches:
    """Rows of token ids, padded on the tokenizer's side."""

    def __init__(self, tokenizer):
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.side = getattr(tokenizer, "padding_side", "right") or "right"

    @staticmethod
    def length(row: list[int]) -> int:
        return len(row)

    def batch(self, rows: Sequence[list[int]], device: str = "cpu") -> Batch:
        ids, mask = (t.to(device) for t in pad_batch(rows, self.pad, self.side))
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding keeps real positions
        return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}, {"tokens": mask}

    def probe(self, row: list[int], device: str = "cpu") -> Batch:
        """A short batch that teaches the accumulator its keys and order."""
        return self.batch([row[:8]], device)
