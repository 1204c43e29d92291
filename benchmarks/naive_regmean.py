"""The reference's way of merging, for comparison: load both experts and all their grams into
memory at once, solve every Linear with `torch.linalg.lstsq`, save the whole state dict.

    python benchmarks/naive_regmean.py --alpha 0.1 --out DIR EXPERT0 GRAMS0 EXPERT1 GRAMS1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("pairs", nargs="+", type=Path)
    args = parser.parse_args()
    experts = [load_dir(p) for p in args.pairs[0::2]]
    grams = []
    for gdir in args.pairs[1::2]:
        index = json.loads((gdir / "grams.json").read_text())
        tensors = load_dir(gdir)
        # the reference keeps one gram per module (q/k/v stored separately although identical)
        grams.append({m: tensors[ref["key"]].clone() / index["num_tokens"] for m, ref in index["modules"].items()})
    merged = {}
    for name in experts[0]:
        module = name.removesuffix(".weight")
        if module in grams[0]:
            shrunk = [args.alpha * g[module] + (1 - args.alpha) * torch.diag(torch.diagonal(g[module])) for g in grams]
            lhs = sum(shrunk)
            rhs = sum(s @ e[name].T for s, e in zip(shrunk, experts))
            merged[name] = torch.linalg.lstsq(lhs, rhs).solution.T.contiguous()
        else:
            merged[name] = sum(e[name] for e in experts) / len(experts)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(args.out / "model.safetensors"))


if __name__ == "__main__":
    main()
