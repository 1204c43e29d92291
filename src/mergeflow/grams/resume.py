"""Checkpoints of partial gram sums, so a killed run continues instead of losing hours.

The checkpoint lives next to the output, in a hidden `.<out>.partial/` directory (ignored by DVC,
see `.dvcignore`), and is removed once the grams are written. Each rank writes its partial sums
into a fresh `rank<R>-step-<N>/` directory, one safetensors file per tensor (memory: one tensor's
copy), then atomically replaces `rank<R>.json`, which names that directory: a kill at any moment
leaves the previous complete checkpoint. Layer groups already finished (`max_gram_memory`) are
kept as final gram files in `done/`. A checkpoint made by a different command (another model, data
file or parameter) is recognised by its fingerprint and discarded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_file, write_json

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


class Checkpoint:
    def __init__(self, out: Path, fingerprint: str, rank: int = 0):
        self.root = out.parent / f".{out.name}.partial"
        self.fingerprint, self.rank = fingerprint, rank
        self.done = self.root / "done"
        self._state = self.root / f"rank{rank}.json"

    def prepare(self) -> None:
        """Keep a checkpoint of this same command; discard any other (rank 0 only)."""
        marker = self.root / "fingerprint"
        if self.root.exists() and (not marker.is_file() or marker.read_text().strip() != self.fingerprint):
            log.warning("%s: a checkpoint of a different command (model, data or parameters); starting over", self.root)
            shutil.rmtree(self.root)
        self.done.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            marker.write_text(self.fingerprint + "\n")

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
            with atomic_file(step / f"{i:04d}.safetensors") as tmp:
                save_file({key: tensor.detach().cpu().contiguous()}, str(tmp))
        write_json(self._state, {"group": progress.group, "batch": progress.batch, "num_tokens": progress.num_tokens, "step": step_name})
        if previous and previous != step_name:
            shutil.rmtree(self.root / previous, ignore_errors=True)

    def done_file(self, name: str) -> Optional[Path]:
        path = self.done / name
        return path if path.is_file() else None

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
