"""Calibration of encoder-decoders (T5, Flan-T5, BART): input/target pairs, the decoder teacher-forced.

A row holds an input (field `gram.text_field`) and a target (field `gram.target_field`): the
encoder reads the input, the decoder reads the target behind its start token, shifted right as in
training, so every decoder Linear sees the states it sees when the model produces that target.
When the file has a target field, every row needs a target (an error names the first row without
one); a file without that field gives encoder inputs only, and the decoder then sees its start
token alone, one decoder token per row (a warning says so).

Both sides are padded on the right (learnt absolute positions, as BART's, stay in place); the
encoder's mask covers the encoder stream, the decoder's the decoder stream (`batches.py`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence


from .batches import Batch, pad_batch
from .data import read_table, select_rows, tokenize

log = logging.getLogger(__name__)
Pair = tuple[object, Optional[str]]  # (input text or chat messages, target text or None)
Encoded = tuple[list[int], list[int]]  # (encoder ids, decoder input ids)


def load_pairs(path: str | Path, input_field: str = "text", target_field: str = "target", *,
               num_samples: Optional[int] = None, seed: Optional[int] = None) -> list[Pair]:
    """The selected rows' `(input, target)`; target None for every row of a file without `target_field`."""
    table = read_table(path, input_field)
    has_targets = target_field in table.column_names
    if has_targets:
        check_targets(Path(path), target_field, table[target_field])
    else:
        log.warning("%s: rows have no %r field (fields: %s): the decoder sees only its start token; give input/target rows "
                    "(gram.target_field / --target-field) to calibrate it on targets", path, target_field, sorted(table.column_names))
    selected = select_rows(table, num_samples=num_samples, seed=seed)
    inputs = selected[input_field]
    missing = [i + 1 for i, v in enumerate(inputs) if v is None or v == "" or v == []]
    if missing:
        raise ValueError(f"{path}: rows {missing[:5]} (of the selection) have no {input_field!r} value")
    targets = selected[target_field] if has_targets else [None] * len(inputs)
    return list(zip(inputs, targets))


def check_targets(path: Path, field: str, values: Sequence) -> None:
    """Every row's target must be non-empty text: the first row that is not is named."""
    for number, value in enumerate(values, start=1):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"{path}: row {number} has no {field!r} value; a seq2seq model is calibrated on input/target pairs "
                             "(the decoder is teacher-forced on the target): fill it in or drop the row")
        if not isinstance(value, str):
            raise ValueError(f"{path}: row {number}: {field!r} is {type(value).__name__} ({value!r:.40}), not text; write the target as a string")


def tokenize_pairs(pairs: Sequence[Pair], tokenizer, max_length: int, decoder_start: int) -> list[Encoded]:
    """`(encoder ids, decoder input ids)` per row, each truncated to `max_length`: the decoder's
    are the target's ids shifted right behind `decoder_start` (just `[decoder_start]` without a target)."""
    inputs = tokenize([p[0] for p in pairs], tokenizer, max_length)
    encoded = []
    for ids, (_, target) in zip(inputs, pairs):
        labels = tokenizer(text_target=target, truncation=True, max_length=max_length)["input_ids"] if target is not None else []
        encoded.append((ids, [decoder_start, *labels[:-1]]))
    return encoded


class Seq2SeqBatches:
    """Encoder and decoder rows, both padded on the right; streams `encoder` and `decoder`."""

    def __init__(self, tokenizer, decoder_start: int):
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.decoder_start = decoder_start

    @staticmethod
    def length(row: Encoded) -> int:
        return len(row[0]) + len(row[1])

    def batch(self, rows: Sequence[Encoded], device: str = "cpu") -> Batch:
        ids, mask = (t.to(device) for t in pad_batch([r[0] for r in rows], self.pad, "right"))
        dec_ids, dec_mask = (t.to(device) for t in pad_batch([r[1] for r in rows], self.pad, "right"))
        inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec_ids, "decoder_attention_mask": dec_mask}
        return inputs, {"encoder": mask, "decoder": dec_mask}

    def probe(self, row: Encoded, device: str = "cpu") -> Batch:
        """A short batch whose encoder and decoder lengths differ, so that each module's stream
        shows in the number of tokens its input holds."""
        enc, dec = row[0][:8], row[1][:8]
        if len(dec) == len(enc):
            dec = dec[:-1] if len(dec) > 1 else [*dec, self.pad]
        return self.batch([(enc, dec)], device)


def decoder_start_id(model) -> int:
    """The token the decoder starts from (T5: pad, BART: eos), from the model's config."""
    config = model.config
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise ValueError(f"{getattr(config, 'name_or_path', 'the model')}: config has no decoder_start_token_id; set it in config.json")
    return int(start)
