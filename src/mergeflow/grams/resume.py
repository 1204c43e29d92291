"""Resuming a killed gram run: a checkpoint of the partial sums every N batches, so a kill after
hours of forward passes (preemption, OOM, Ctrl-C) continues instead of losing hours.

The checkpoint lives next to the output, in a hidden `.<out>.partial/` directory (ignored by git and
DVC: `.gitignore`, `.dvcignore`). Each rank writes its partial sums into a fresh
`rank<R>-step-<N>/` directory, one safetensors file per tensor (memory: one tensor's copy), then
atomically replaces `rank<R>.json`, which names that directory: a kill at any moment leaves the
previous complete checkpoint. Layer groups already finished (`max_gram_memory`) are kept as final
gram files in `done/`, each with its size and SHA-256 beside it (`<file>.json`, written after the
file, before the checkpoint says the group is finished). A checkpoint made by a different command
(another model, data file or parameter), or whose finished files are not all there, is discarded.

Publishing is one atomic step, and the checkpoint survives it: the finished files are hard-linked
(never moved) into a fresh `publish/` inside the checkpoint, grams.json is written there, and
`atomic.publish` swaps `publish/` with the output (renameat2 RENAME_EXCHANGE: never an instant without
an output); only then is the checkpoint removed (its `fingerprint` first, so a half-removed
checkpoint is never resumed). A kill at any instant leaves the output absent or complete (the old
one or the new one), and the rerun publishes the same bytes again.

`owner.json` (`atomic.claim_dir`, the format of atomic's `.tmp-` names) records who is writing the
checkpoint: a checkpoint whose owner may still run, or that holds files without an owner record,
is never touched (the command refuses, in one line); one whose owner is provably dead is resumed or
discarded, and the log says how we know it is dead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..atomic import OWNER_FILE, atomic_file, claim_dir, publish, remove_path, umask, write_json
from ..faults import fault_point
from .format import FORMAT, INDEX, GramRef, GramWriter, disk_errors, file_record, save_tensors

log = logging.getLogger(__name__)


def fingerprint(**what) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_identity(path: Path) -> list:
    """Path, size and mtime: enough to notice a replaced model or data file without hashing it."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


@dataclass
class Progress:
    group: int = 0
    batch: int = 0
    num_tokens: int = 0


class GramResume:
    """The resumable state of one `compute_grams` run beside its output (`.<out>.partial/`):
    finished layer files, each rank's partial sums and progress, keyed by the run's fingerprint.
    (Not a model checkpoint: those are `model_files.py`'s.)"""

    def __init__(self, out: Path, fingerprint: str, rank: int = 0):
        self.out = out
        self.root = out.parent / f".{out.name}.partial"
        self.fingerprint, self.rank = fingerprint, rank
        self.done = self.root / "done"
        self._state = self.root / f"rank{rank}.json"

    def of_this_command(self) -> bool:
        """Whether the checkpoint on disk was made by this same command (its fingerprint)."""
        marker = self.root / "fingerprint"
        return marker.is_file() and marker.read_text().strip() == self.fingerprint

    def holds_published_output(self) -> bool:
        """Whether `out` is exactly what this checkpoint published: its grams.json lists the
        checkpoint's finished files, each with the record the checkpoint keeps for it. True after
        a run killed between the swap and the checkpoint's removal; reads only small JSON files."""
        try:
            files = json.loads((self.out / INDEX).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        finished = {p.name for p in self.done.glob("*.safetensors")}
        return bool(files) and set(files) == finished and all(self.done_record(f) == record for f, record in files.items())

    def prepare(self, group_files: Sequence[Iterable[str]] = ()) -> None:
        """Resume a checkpoint of this same command left by a dead process; discard any other, and
        one that lacks a file of a group it says is finished (`group_files[g]`: the files layer
        group g writes); refuse one whose owner may still run (rank 0 only)."""
        marker = self.root / "fingerprint"
        existed = self.root.is_dir()
        why = claim_dir(self.root, what=f"the checkpoint of a gram run for {self.out}") or "no other live run owns it"
        stale = None
        if existed and not self.of_this_command():
            stale = f"a checkpoint of a different command (model, data or parameters) or an incomplete one; starting over ({why})"
        elif existed and (lost := self.lost_files(group_files)):  # never build on half a previous attempt
            stale = f"finished layer files {lost[:3]} are missing or damaged; starting over"
        if stale:
            log.warning("%s: %s", self.root, stale)
            self.clear()
            claim_dir(self.root)
        elif existed:
            log.info("%s: a checkpoint of this command, left by an interrupted run (%s)", self.root, why)
        self.done.mkdir(exist_ok=True)
        if not marker.is_file():
            marker.write_text(self.fingerprint + "\n")

    def lost_files(self, group_files: Sequence[Iterable[str]]) -> list[str]:
        """The files of the groups this rank's checkpoint says are finished that `done/` lacks (or
        whose size no longer matches their record)."""
        files = {f for files in group_files[: self.groups_finished()] for f in files}
        return sorted(f for f in files if self.done_record(f) is None)

    def load(self, device: str | torch.device) -> tuple[Progress, dict[str, torch.Tensor]]:
        if not self._state.is_file():
            return Progress(), {}
        state = json.loads(self._state.read_text())
        step = self.root / state["step"]
        sums = {}
        for file in sorted(step.glob("*.safetensors")):
            sums.update({k: v.to(device) for k, v in load_file(file).items()})
        progress = Progress(state["group"], state["batch"], state["num_tokens"])
        log.info("resuming from %s: layer group %d, batch %d, %d tokens", step, progress.group, progress.batch, progress.num_tokens)
        return progress, sums

    def save(self, progress: Progress, sums: dict[str, torch.Tensor]) -> None:
        previous = json.loads(self._state.read_text())["step"] if self._state.is_file() else None
        step_name = f"rank{self.rank}-step-{progress.group:03d}-{progress.batch:07d}"
        step = self.root / step_name
        if step.exists():
            shutil.rmtree(step)
        step.mkdir(parents=True)
        for i, (key, tensor) in enumerate(sorted(sums.items())):
            with disk_errors(step / f"{i:04d}.safetensors"), atomic_file(step / f"{i:04d}.safetensors") as tmp:
                save_file({key: tensor.detach().cpu().contiguous()}, str(tmp))
        with disk_errors(self._state):
            write_json(self._state, {"group": progress.group, "batch": progress.batch, "num_tokens": progress.num_tokens, "step": step_name})
        if previous and previous != step_name:
            shutil.rmtree(self.root / previous, ignore_errors=True)

    def write_done(self, file: str, tensors: Mapping[str, torch.Tensor], version: str = FORMAT) -> None:
        """A finished layer file in `done/`, then its record (size, SHA-256) beside it."""
        with disk_errors(self.done / file), atomic_file(self.done / file) as tmp:
            save_tensors(tensors, tmp, version)
            record = file_record(tmp)  # hashed while it is in the page cache
        fault_point("grams:group-written")
        with disk_errors(self.done / f"{file}.json"):
            write_json(self.done / f"{file}.json", record)
        fault_point("grams:group-recorded")

    def groups_finished(self) -> int:
        """How many layer groups this rank's checkpoint says are finished."""
        try:
            return int(json.loads(self._state.read_text())["group"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def done_record(self, file: str) -> Optional[dict]:
        """The record of a finished file whose size still matches it, else None."""
        try:
            record = json.loads((self.done / f"{file}.json").read_text())
            return record if (self.done / file).stat().st_size == record["bytes"] else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def publish(self, files: list[str], refs: Mapping[str, GramRef], **meta) -> None:
        """Put the finished `files` and their grams.json in the place of `out` in one atomic swap
        (`atomic.publish`: never an instant without an output), then remove the checkpoint (rank 0
        only). Every step can be interrupted and redone."""
        fault_point("grams:publish-begin")
        staging = self.root / "publish"
        if staging.exists():  # half of an earlier attempt (or the output it replaced): never built on
            shutil.rmtree(staging)
        staging.mkdir()
        writer = GramWriter(staging)
        for file in files:
            record = self.done_record(file)
            if record is None:
                raise ValueError(f"{self.done / file}: missing or not the file its record describes; remove {self.root} and rerun the same command")
            link_or_copy(self.done / file, staging / file)
            writer.add_file(file, record)
            fault_point("grams:publish-linked")
        writer.finish(refs, **meta)
        fault_point("grams:publish-indexed")
        os.chmod(staging, 0o777 & ~umask())
        publish(staging, self.out)
        fault_point("grams:publish-renamed")
        self.clear()

    def clear(self) -> None:
        """Remove the checkpoint: its fingerprint first (a half-removed one is never resumed), its
        owner record last (a half-removed one can still be proved dead, and removed by the rerun)."""
        (self.root / "fingerprint").unlink(missing_ok=True)
        fault_point("grams:partial-unmarked")
        if not self.root.is_dir():
            return
        for item in self.root.iterdir():
            if item.name != OWNER_FILE:
                remove_path(item)
        fault_point("grams:partial-emptied")
        (self.root / OWNER_FILE).unlink(missing_ok=True)
        self.root.rmdir()


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (instant, no extra disk), or a copy where the filesystem has none."""
    try:
        os.link(src, dst)
    except OSError:
        with disk_errors(dst):
            shutil.copy2(src, dst)
