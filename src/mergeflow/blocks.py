"""Where a tensor or module sits in a transformer: the one pattern for the blocks (`layers.N.`)."""

from __future__ import annotations

import re
from typing import Optional

BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(name: str) -> Optional[int]:
    """The block a tensor or module belongs to (`model.layers.3.mlp.up_proj` -> 3); None outside the blocks."""
    match = BLOCK.search(name if name.endswith(".") else f"{name}.")
    return int(match.group(1)) if match else None
