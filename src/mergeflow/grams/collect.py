"""Computing grams: calibration text forwarded through a model, `sum x x^T` of Linear inputs.

One `compute_grams` call handles a plain run, a slice of the data (`shard="i/n"`, for machines that
each compute a part; `mergeflow grams sum` adds the parts), a `torchrun` launch (each rank takes a
slice and the sums are all-reduced: gloo on CPU, NCCL on GPU), a bounded accumulator memory
(`max_gram_memory`: the layers are split into groups and each group gets its own pass over the
data, stopping the forward after the group's last layer), and resumption from the last checkpoint
of a killed run with the same command.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import parse_size
from ..models import is_encoder_decoder, load_model
from .accumulate import GramAccumulator, symmetric
from .batches import CausalBatches, pad_batch  # noqa: F401  pad_batch: where callers found it before
from .data import load_rows, parse_shard, slice_of, tokenize
from .moe import expert_slots, fused_expert_warning, input_width, routers
from .seq2seq import Seq2SeqBatches, decoder_start_id, load_pairs, tokenize_pairs
from .format import check_gram_output, file_for, model_identity, sha256_of
from .resume import Checkpoint, Progress, file_identity, fingerprint

log = logging.getLogger(__name__)
_IN_BLOCK = re.compile(r"(^|\.)(layers|block)\.\d+\.")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def block_linears(model: nn.Module, include_lm_head: bool = False) -> dict[str, nn.Linear]:
    """The Linears inside the transformer blocks, by qualified name (`model.layers.0.mlp.up_proj`),
    and the output layer `lm_head` when asked for."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (_IN_BLOCK.search(name) or (include_lm_head and name == "lm_head"))
    }


def read_texts(data: str | Path, text_field: str = "text", num_samples: int | None = None, seed: int | None = None) -> list:
    """The calibration rows' text (or chat messages), as `compute_grams` selects them."""
    return load_rows(data, text_field, num_samples=num_samples, seed=seed)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def plan_groups(order: list[str], keys: dict[str, str], in_features: dict[str, int], element: int, budget: Optional[int]) -> list[list[str]]:
    """Split the distinct inputs into consecutive groups of whole layers within `budget` bytes."""
    owners = [m for m in order if keys[m] == m]
    layers: list[tuple[str, list[str], int]] = []
    for owner in owners:
        file, size = file_for(owner), in_features[owner] ** 2 * element
        if layers and layers[-1][0] == file:
            layers[-1][1].append(owner)
            layers[-1] = (file, layers[-1][1], layers[-1][2] + size)
        else:
            layers.append((file, [owner], size))
    if budget is None:
        return [owners]
    groups: list[list[str]] = []
    used = budget + 1
    for file, members, size in layers:
        if size > budget:
            raise ValueError(f"max_gram_memory {budget} bytes is below the {size} bytes of the grams of one layer ({file}); raise it")
        if used + size > budget:
            groups.append([])
            used = 0
        groups[-1].extend(members)
        used += size
    return groups


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if self.world > 1:
            torch.distributed.all_reduce(tensor)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def setup_device_and_ranks(device: str) -> tuple[str, Distributed]:
    """Resolve `auto`, and join a torchrun launch when there is one (WORLD_SIZE > 1)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return device, Distributed()
    if device == "cuda":  # one GPU per rank, among those CUDA_VISIBLE_DEVICES shows
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device, Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())


@torch.no_grad()
def compute_grams(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    max_length: int = 64,
    batch_size: int = 32,
    num_samples: int | None = None,
    seed: int | None = None,
    text_field: str = "text",
    target_field: str = "target",
    device: str = "cpu",
    model_dtype: str = "float32",
    dtype: str = "float32",
    include_lm_head: bool = False,
    accumulate_on: str = "device",
    max_gram_memory: int | str | None = None,
    checkpoint_every: int = 50,
    shard: str | None = None,
    overwrite: bool = True,
) -> int:
    """Compute and write the grams of `model_dir` on `data`; return the number of tokens seen.
    An existing `out` is replaced only with `overwrite`, and only if it is a gram directory that
    holds nothing mergeflow did not write (`format.check_gram_output`); without `overwrite` only
    when it is what this same command's checkpoint already published (a run killed before it
    removed the checkpoint), which the rerun publishes again from the checkpoint, then removes."""
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"max_length and batch_size must be at least 1 (got {max_length}, {batch_size})")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"gram dtype must be float32 or float64, got {dtype!r}")
    if accumulate_on not in ("device", "cpu"):
        raise ValueError(f"accumulate_on must be 'device' or 'cpu', got {accumulate_on!r}")
    model_dir, data, out = Path(model_dir), Path(data), Path(out)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; --model must be a Hugging Face model directory")
    shard_index, shard_count = parse_shard(shard)
    # a run killed after publishing `out`, before removing its checkpoint: the rerun finishes it
    published = Checkpoint(out, fingerprint="").holds_published_output()
    check_gram_output(out, force=overwrite or published, inputs=[model_dir, data])
    budget = parse_size(max_gram_memory) if isinstance(max_gram_memory, str) else max_gram_memory
    acc_dtype = DTYPES[dtype]

    seq2seq = is_encoder_decoder(model_dir)
    if seq2seq:  # (input, target) pairs: the decoder is teacher-forced on the target
        selected = load_pairs(data, text_field, target_field, num_samples=num_samples, seed=seed)
    else:
        selected = load_rows(data, text_field, num_samples=num_samples, seed=seed)
    rows = [selected[i] for i in slice_of(len(selected), shard_index, shard_count)]
    if not rows:
        raise ValueError(f"{data}: shard {shard_index}/{shard_count} of {len(selected)} rows is empty; use fewer shards")
    device, ranks = setup_device_and_ranks(device)
    model, tokenizer = load_model(model_dir, device=device, dtype=DTYPES[model_dtype])
    if seq2seq:
        start = decoder_start_id(model)
        batcher, encoded = Seq2SeqBatches(tokenizer, start), tokenize_pairs(rows, tokenizer, max_length, start)
    else:
        batcher, encoded = CausalBatches(tokenizer), tokenize(rows, tokenizer, max_length)
    mine = [encoded[i] for i in slice_of(len(encoded), ranks.rank, ranks.world)]
    slots, unsolved = expert_slots(model)  # MoE: one gram per saved expert tensor, over the tokens routed to it
    linears = {**block_linears(model, include_lm_head), **routers(model), **slots}
    if unsolved and ranks.main:
        log.warning("%s: %s", model_dir, fused_expert_warning(unsolved))
    if not linears:
        raise ValueError(f"{model_dir}: no nn.Linear inside transformer blocks (`layers.N.`) to compute grams for")

    probe = GramAccumulator(linears)  # learns which modules share an input, and the execution order
    try:
        probe.forward_batch(model, *batcher.probe(encoded[0], device), accumulate=False)
    finally:
        probe.close()
    keys, order, streams = probe.keys, probe.order, probe.streams
    in_features = {name: input_width(linears[name]) for name in keys}
    groups = plan_groups(order, keys, in_features, acc_dtype.itemsize, budget)

    weights = sorted(p for p in model_dir.iterdir() if p.suffix == ".safetensors" or p.name == "config.json")
    ckpt = Checkpoint(out, fingerprint(
        model=[file_identity(p) for p in weights], data=file_identity(data), max_length=max_length, batch_size=batch_size,
        num_samples=num_samples, seed=seed, text_field=text_field, model_dtype=model_dtype, dtype=dtype,
        **({"target_field": target_field} if seq2seq else {}),
        include_lm_head=include_lm_head, shard=[shard_index, shard_count], world=ranks.world, groups=groups,
    ), ranks.rank)
    if published and not overwrite and not ckpt.of_this_command():  # another command's grams: refused as ever
        check_gram_output(out, force=False, inputs=[model_dir, data])
    if ranks.main:
        ckpt.prepare([{file_for(o) for o in owners} for owners in groups])
    ranks.barrier()
    progress, saved = ckpt.load(device if accumulate_on == "device" else "cpu")

    batches = length_sorted_batches([batcher.length(row) for row in mine], batch_size)
    tokens_per_pass = sum(map(batcher.length, mine))
    bar = tqdm(total=tokens_per_pass * len(groups), desc=f"grams {model_dir.name}", unit="tok", unit_scale=True, disable=not ranks.main or None)
    bar.update(tokens_per_pass * progress.group + sum(batcher.length(mine[i]) for b in batches[: progress.batch] for i in b))
    num_tokens = None
    for g, owners in enumerate(groups):
        if g < progress.group:
            continue
        members = {m: linears[m] for m in keys if keys[m] in owners}
        acc = GramAccumulator(members, dtype=acc_dtype, device="cpu" if accumulate_on == "cpu" else None,
                              stop_after=[m for m in order if m in members][-1])
        acc.keys = {m: keys[m] for m in members}
        acc.streams = {m: streams[m] for m in members}
        acc.sums = {o: torch.zeros(in_features[o], in_features[o], dtype=acc_dtype, device=device if accumulate_on == "device" else "cpu") for o in owners}
        start = 0
        if g == progress.group and progress.batch:
            start, acc.num_tokens = progress.batch, progress.num_tokens
            for key, value in saved.items():
                acc.sums[key].copy_(value)
        try:
            for b in range(start, len(batches)):
                inputs, masks = batcher.batch([mine[i] for i in batches[b]], device)
                acc.forward_batch(model, inputs, masks)
                bar.update(sum(int(mask.sum()) for mask in masks.values()))
                if checkpoint_every and (b + 1) % checkpoint_every == 0 and b + 1 < len(batches):
                    ckpt.save(Progress(g, b + 1, acc.num_tokens), acc.sums)
        finally:
            acc.close()
        count = torch.tensor([acc.num_tokens], dtype=torch.long, device=device)
        ranks.all_reduce(count)
        num_tokens = int(count)
        for key in sorted(acc.sums):
            ranks.all_reduce(acc.sums[key])
        if ranks.main:
            write_group(ckpt, {key: symmetric(acc.sums[key]).cpu() for key in owners}, acc_dtype)
            ckpt.save(Progress(g + 1, 0, num_tokens), {})
        ranks.barrier()
        if not ranks.main:
            ckpt.save(Progress(g + 1, 0, num_tokens), {})
        del acc
    bar.close()
    if num_tokens is None:  # every group was done before a kill between the last group and the output
        num_tokens = progress.num_tokens
    if ranks.main:
        calibration = {"sha256": sha256_of(data), "rows": len(selected), "text_field": text_field, "num_samples": num_samples, "seed": seed, "max_length": max_length}
        if seq2seq:  # num_tokens counts encoder tokens; decoder grams are divided by it too
            calibration["target_field"] = target_field
        ckpt.publish(
            sorted({file_for(o) for o in keys.values()}), keys, num_tokens=num_tokens, model=str(model_dir), dtype=dtype,
            shard=f"{shard_index}/{shard_count}" if shard_count > 1 else None,
            model_id=model_identity(model_dir), data=str(data), calibration=calibration,
        )
    ranks.barrier()
    if ranks.world > 1:
        torch.distributed.destroy_process_group()
    if ranks.main:
        log.info("grams of %s: %d modules (%d distinct inputs), %d tokens, %d pass(es) -> %s", model_dir, len(keys), sum(map(len, groups)), num_tokens, len(groups), out)
    return num_tokens


def write_group(ckpt: Checkpoint, sums: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """A finished layer group's grams, as final per-layer files in the checkpoint's `done/`."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sums.items():
        files.setdefault(file_for(key), {})[key] = tensor.to(dtype).contiguous()
    for file, tensors in files.items():
        ckpt.write_done(file, tensors)
