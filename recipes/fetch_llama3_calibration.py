"""Calibration data of the llama3-code-math recipe, as the RegMean reference used it.

The first `--rows` training rows of each expert's own training set, as chat messages that
`mergeflow grams` renders with the model's chat template (truncated by gram.max_length: 256):

    code: Replete-AI/code_bagel_hermes-2.5  (ShareGPT `conversations`)
    math: TIGER-Lab/WebInstructSub          (`question` / `answer`)

    python recipes/fetch_llama3_calibration.py [--rows 10000] [--out data-src/calib]

`--rows 1000` is the cheap option (a tenth of the gram time; RegMean needs far fewer tokens than
the 2.5M of the reference to estimate grams of width 4096, though the 14336-wide down_proj grams
get noisier). Needs the hub (or the datasets in the HF cache).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SOURCES = {
    "code": ("Replete-AI/code_bagel_hermes-2.5", lambda row: [{"role": {"human": "user", "gpt": "assistant"}.get(m["from"], m["from"]), "content": m["value"]} for m in row["conversations"]]),
    "math": ("TIGER-Lab/WebInstructSub", lambda row: [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]),
}


def fetch(expert: str, rows: int, out: Path) -> Path:
    from datasets import load_dataset

    repo, to_messages = SOURCES[expert]
    data = load_dataset(repo, split=f"train[:{rows}]")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{expert}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for row in data:
            f.write(json.dumps({"messages": to_messages(row)}) + "\n")
    tmp.replace(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10000)
    p.add_argument("--out", type=Path, default=Path("data-src/calib"))
    p.add_argument("--expert", choices=sorted(SOURCES), action="append", help="only these experts [default: both]")
    args = p.parse_args()
    for expert in args.expert or sorted(SOURCES):
        print(f"{expert}: {fetch(expert, args.rows, args.out)}")


if __name__ == "__main__":
    main()
