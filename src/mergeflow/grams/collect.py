"""Computing grams: calibration text forwarded through a model, `sum x x^T` of Linear inputs.

One `compute_grams` call handles a plain run, a slice of the data (`shard="i/n"`, for machines that
each compute a part; `mergeflow grams sum` adds the parts), a `torchrun` launch (each rank takes a
slice and the sums are all-reduced: gloo on CPU, NCCL on GPU), a bounded accumulator memory
(`max_gram_memory`: the layers are split into groups and each group gets its own pass over the
data, stopping the forward after the group's last layer), and resumption from the last checkpoint
of a killed run with the same command.

It takes one `GramParams` (params.yaml's `gram` group, or what `mergeflow grams` builds from its
options) and runs named steps: select the rows, `prepare_pass` (load the model, find the modules to
solve with `modules.discover`, learn shared inputs with a probe, plan the layer groups),
`run_fingerprint` and the checkpoint, `accumulate_groups` (one `GramAccumulator` per group, which
owns its sums), then publish.
"""

from __future__ import annotations

import logging
import os
from itertools import groupby
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model_files import CONFIG, parse_size, require_model_dir, torch_dtype
from ..models import is_encoder_decoder, load_model
from ..params import GramParams
from .accumulate import SUM_SUFFIX, GramAccumulator, probe
from .batches import CausalBatches, pad_batch  # noqa: F401  pad_batch: where callers found it before
from .data import load_rows, parse_shard, slice_of, tokenize
from .moe import expert_slots, fused_expert_warning
from .seq2seq import Seq2SeqBatches, decoder_start_id, load_pairs, tokenize_pairs
from .format import GramRef, by_file, check_gram_output, format_for, model_identity, sha256_of
from .modules import ModuleMap, discover
from .resume import GramResume, Progress, file_identity, fingerprint

log = logging.getLogger(__name__)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def plan_groups(order: list[str], keys: dict[str, str], in_features: dict[str, int], files: dict[str, str], element: int, budget: Optional[int]) -> list[list[str]]:
    """Split the distinct inputs into consecutive groups of whole blocks (gram files) within `budget` bytes."""
    owners = [m for m in order if keys[m] == m]
    if budget is None:
        return [owners]
    groups: list[list[str]] = []
    used = budget + 1
    for file, members in groupby(owners, key=files.__getitem__):  # runs of inputs stored in one gram file
        members = list(members)
        size = sum(in_features[m] ** 2 * element for m in members)
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


@dataclass
class GramPass:
    """What every layer group's pass over this process's rows shares."""

    model: nn.Module
    modules: ModuleMap
    keys: dict[str, str]       # module -> the module whose input it shares (the stored key)
    order: list[str]           # execution order
    streams: dict[str, str]    # module -> the token stream its input belongs to (encoder or decoder)
    groups: list[list[str]]    # distinct inputs (owners), one pass over the data per group
    rows: list                 # this process's token ids (encoder-decoders: (encoder ids, decoder ids))
    batches: list[list[int]]   # indices into `rows`, of similar length
    batcher: CausalBatches | Seq2SeqBatches
    device: str
    config: GramParams
    seq2seq: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.config.dtype)

    def batch(self, b: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Batch `b`'s model inputs and its masks by stream."""
        return self.batcher.batch([self.rows[i] for i in self.batches[b]], self.device)

    def tokens_before(self, b: int) -> int:
        return sum(self.batcher.length(self.rows[i]) for batch in self.batches[:b] for i in batch)

    def with_input_sum(self) -> set[str]:
        """The stored keys whose input feeds a Linear with a bias: their token sums are kept too.
        Not an encoder-decoder's decoder stream: its token count is not `num_tokens` (the
        encoder's), which the bias fit's augmented gram assumes, so `regmean_bias: solve` is refused there."""
        return {self.keys[m] for m in self.keys if self.modules.solved[m].bias and self.streams.get(self.keys[m]) != "decoder"}

    def refs(self) -> dict[str, GramRef]:
        """Each module's record in grams.json: its file and key, transposed (Conv1D), input sum."""
        summed = self.with_input_sum()
        return {
            m: GramRef(self.modules.file_of(k), k, self.modules.solved[m].transposed, k + SUM_SUFFIX if k in summed else None)
            for m, k in self.keys.items()
        }

    def accumulator(self, owners: list[str]) -> GramAccumulator:
        members = {m: self.modules.solved[m].module for m in self.keys if self.keys[m] in owners}
        in_features = {o: self.modules.solved[o].in_features for o in owners}
        return GramAccumulator(
            members, {m: self.keys[m] for m in members}, in_features, dtype=self.dtype,
            device=self.device if self.config.accumulate_on == "device" else "cpu",
            with_input_sum=tuple(sorted(self.with_input_sum() & set(owners))), stop_after=[m for m in self.order if m in members][-1],
            streams={m: self.streams[m] for m in members},
        )


@torch.no_grad()
def compute_grams(model_dir: str | Path, data: str | Path, out: str | Path, config: GramParams = GramParams(), *, shard: str | None = None, overwrite: bool = True) -> int:
    """Compute and write the grams of `model_dir` on `data`; return the number of tokens seen.
    An existing `out` is replaced only with `overwrite`, and only if it is a gram directory that
    holds nothing mergeflow did not write (`format.check_gram_output`); without `overwrite` only
    when it is what this same command's checkpoint already published (a run killed before it
    removed the checkpoint), which the rerun publishes again from the checkpoint, then removes."""
    model_dir, data, out = require_model_dir(model_dir), Path(data), Path(out)
    shard_index, shard_count = parse_shard(shard)
    # a run killed after publishing `out`, before removing its checkpoint: the rerun finishes it
    published = GramResume(out, fingerprint="").holds_published_output()
    check_gram_output(out, force=overwrite or published, inputs=[model_dir, data])
    if is_encoder_decoder(model_dir):  # (input, target) pairs: the decoder is teacher-forced on the target
        selected = load_pairs(data, config.text_field, config.target_field, num_samples=config.num_samples, seed=config.seed)
    else:
        selected = load_rows(data, config.text_field, num_samples=config.num_samples, seed=config.seed)
    rows = [selected[i] for i in slice_of(len(selected), shard_index, shard_count)]
    if not rows:
        raise ValueError(f"{data}: shard {shard_index}/{shard_count} of {len(selected)} rows is empty; use fewer shards")
    device, ranks = setup_device_and_ranks(config.device)
    run = prepare_pass(model_dir, rows, config, device, ranks)
    ckpt = GramResume(out, run_fingerprint(run, model_dir, data, (shard_index, shard_count), ranks.world), ranks.rank)
    if published and not overwrite and not ckpt.of_this_command():  # another command's grams: refused as ever
        check_gram_output(out, force=False, inputs=[model_dir, data])
    if ranks.main:
        ckpt.prepare([{run.modules.file_of(o) for o in owners} for owners in run.groups])
    ranks.barrier()
    num_tokens = accumulate_groups(run, ckpt, ranks, model_dir.name)
    if ranks.main:
        calibration = {"sha256": sha256_of(data), "rows": len(selected), "text_field": config.text_field, "num_samples": config.num_samples,
                       "seed": config.seed, "max_length": config.max_length}
        if run.seq2seq:  # num_tokens counts encoder tokens; decoder grams are divided by it too
            calibration["target_field"] = config.target_field
        refs = run.refs()
        extra = {"output_layer": run.modules.output_layer} if run.modules.output_layer not in (None, "lm_head") else {}
        ckpt.publish(
            sorted({ref.file for ref in refs.values()}), refs, num_tokens=num_tokens, model=str(model_dir), dtype=config.dtype,
            shard=f"{shard_index}/{shard_count}" if shard_count > 1 else None,
            model_id=model_identity(model_dir), data=str(data), calibration=calibration, **extra,
        )
    ranks.barrier()
    if ranks.world > 1:
        torch.distributed.destroy_process_group()
    if ranks.main:
        log.info("grams of %s: %d modules (%d distinct inputs), %d tokens, %d pass(es) -> %s", model_dir, len(run.keys), sum(map(len, run.groups)), num_tokens, len(run.groups), out)
    return num_tokens


def prepare_pass(model_dir: Path, rows: list, config: GramParams, device: str, ranks: "Distributed") -> GramPass:
    """Load the model, tokenise this rank's rows, find the modules to solve, learn which share an
    input (a probe forward on one short row) and split them into layer groups."""
    model, tokenizer = load_model(model_dir, device=device, dtype=torch_dtype(config.model_dtype))
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    if seq2seq:
        start = decoder_start_id(model)
        batcher, encoded = Seq2SeqBatches(tokenizer, start), tokenize_pairs(rows, tokenizer, config.max_length, start)
    else:
        batcher, encoded = CausalBatches(tokenizer), tokenize(rows, tokenizer, config.max_length)
    mine = [encoded[i] for i in slice_of(len(encoded), ranks.rank, ranks.world)]
    modules = discover(model, include_lm_head=config.include_lm_head, where=str(model_dir))
    unsolved = expert_slots(model)[1]
    if unsolved and ranks.main:
        log.warning("%s: %s", model_dir, fused_expert_warning(unsolved))
    keys, order, streams = probe(model, modules.linears(), *batcher.probe(encoded[0], device))
    in_features = {name: modules.solved[name].in_features for name in keys}
    files = {name: modules.file_of(name) for name in keys}
    budget = parse_size(config.max_gram_memory) if config.max_gram_memory is not None else None
    groups = plan_groups(order, keys, in_features, files, torch_dtype(config.dtype).itemsize, budget)
    batches = length_sorted_batches([batcher.length(row) for row in mine], config.batch_size)
    return GramPass(model, modules, keys, order, streams, groups, mine, batches, batcher, device, config, seq2seq)


def run_fingerprint(run: GramPass, model_dir: Path, data: Path, shard: tuple[int, int], world: int) -> str:
    """What makes a checkpoint resumable by this command: inputs, parameters and the layer groups."""
    c = run.config
    model_files = sorted(p for p in model_dir.iterdir() if p.suffix == ".safetensors" or p.name == CONFIG)
    return fingerprint(
        model=[file_identity(p) for p in model_files], data=file_identity(data), max_length=c.max_length, batch_size=c.batch_size,
        num_samples=c.num_samples, seed=c.seed, text_field=c.text_field, model_dtype=c.model_dtype, dtype=c.dtype,
        include_lm_head=c.include_lm_head, shard=list(shard), world=world, groups=run.groups,
        **({"target_field": c.target_field} if run.seq2seq else {}),
    )


def accumulate_groups(run: GramPass, ckpt: GramResume, ranks: "Distributed", label: str) -> int:
    """One pass over the data per layer group not finished yet (resuming a killed one from its last
    checkpoint); each finished group's grams go to the checkpoint's `done/`. Returns the token count."""
    progress, saved = ckpt.load(run.device if run.config.accumulate_on == "device" else "cpu")
    tokens_per_pass = sum(map(run.batcher.length, run.rows))
    bar = tqdm(total=tokens_per_pass * len(run.groups), desc=f"grams {label}", unit="tok", unit_scale=True, disable=not ranks.main or None)
    bar.update(tokens_per_pass * progress.group + run.tokens_before(progress.batch))
    num_tokens = progress.num_tokens  # when every group was done before a kill between the last group and the output
    for g in range(progress.group, len(run.groups)):
        resume = (progress.batch, progress.num_tokens, saved) if g == progress.group and progress.batch else (0, 0, {})
        num_tokens = accumulate_group(run, g, ckpt, ranks, bar, resume)
    bar.close()
    return num_tokens


def accumulate_group(run: GramPass, g: int, ckpt: GramResume, ranks: "Distributed", bar, resume: tuple) -> int:
    """One layer group's pass: its sums all-reduced across ranks, written, and recorded finished."""
    start, tokens, saved = resume
    acc = run.accumulator(run.groups[g])
    acc.restore(tokens, saved)
    every = run.config.checkpoint_every
    try:
        for b in range(start, len(run.batches)):
            inputs, masks = run.batch(b)
            acc.forward_batch(run.model, inputs, masks)
            bar.update(sum(int(mask.sum()) for mask in masks.values()))
            if every and (b + 1) % every == 0 and b + 1 < len(run.batches):
                ckpt.save(Progress(g, b + 1, acc.num_tokens), acc.state())
    finally:
        acc.close()
    count = torch.tensor([acc.num_tokens], dtype=torch.long, device=run.device)
    ranks.all_reduce(count)
    state = acc.state()
    for key in sorted(state):
        ranks.all_reduce(state[key])
    if ranks.main:
        write_group(ckpt, acc.result(), run.modules, run.dtype, format_for(run.refs().values()))
        ckpt.save(Progress(g + 1, 0, int(count)), {})
    ranks.barrier()  # rank 0's finished files come first: no rank's checkpoint claims a group done/ lacks
    if not ranks.main:
        ckpt.save(Progress(g + 1, 0, int(count)), {})
    ranks.barrier()  # and every rank's checkpoint is written before rank 0 may publish and remove it
    return int(count)


def write_group(ckpt: GramResume, grams: dict[str, torch.Tensor], modules: ModuleMap, dtype: torch.dtype, version: str) -> None:
    """A finished layer group's grams (and input sums), as final per-layer files in the checkpoint's `done/`."""
    for file, keys in by_file(grams, lambda key: modules.file_of(key.removesuffix(SUM_SUFFIX))).items():
        ckpt.write_done(file, {key: grams[key].to(dtype).contiguous() for key in keys}, version)
