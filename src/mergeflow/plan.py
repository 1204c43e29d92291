"""`mergeflow plan`: what a run of the current params will cost, from model configs alone.

Before hours of GPU time, a user wants to know the disk each stage writes, the gram FLOPs and an
estimated time per expert, the merge's peak memory, and whether it all fits this machine. All of
it follows from `config.json` (layer shapes, dtype) and the params: the plan reads configs from
the toy zoo's params, a local directory, the Hugging Face cache or the hub (config.json only),
never weights.

The merge's peak is the streaming engine's bound: RegMean holds, for its widest solved Linear of
`n` inputs and `out` rows, two `n x n` matrices (the gram sum and its Cholesky factor) plus about
`experts + 3` `out x n` float32 tensors (the experts' weights, the reference, the update and the
right-hand side); other tensors stream in 256 MB row blocks. (Measured on Llama-3-8B shapes:
2.58 GiB against this bound's 2.8 GB.)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .grams.accumulate import panel_bounds
from .params import HubModel, Params

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
BLOCK_BYTES = 256 * 2**20
RUNTIME_BYTES = 300 * 2**20  # Python, torch and the libraries


@dataclass(frozen=True)
class Shape:
    """The sizes of a Llama-architecture decoder that the costs depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dtype: str

    @classmethod
    def from_config(cls, config: dict, where: str) -> "Shape":
        text = config.get("text_config", config)
        try:
            hidden, heads = text["hidden_size"], text["num_attention_heads"]
            return cls(
                hidden=hidden, intermediate=text["intermediate_size"], layers=text["num_hidden_layers"], heads=heads,
                kv_heads=text.get("num_key_value_heads") or heads, head_dim=text.get("head_dim") or hidden // heads,
                vocab=text["vocab_size"], tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
            )
        except KeyError as err:
            raise ValueError(f"{where}: config lacks {err}; mergeflow plan understands Llama-style decoder configs") from None

    @property
    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of one layer's Linears."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h), ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]

    @property
    def parameters(self) -> int:
        per_layer = sum(n * o for _, n, o in self.linears) + 2 * self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * per_layer + self.hidden

    def model_bytes(self, dtype: Optional[str] = None) -> int:
        return self.parameters * BYTES.get(dtype or self.dtype, 4)

    def distinct_inputs(self, lm_head: bool) -> list[int]:
        """Widths of the distinct Linear inputs grams are kept for: q/k/v share one, gate/up one."""
        q = self.heads * self.head_dim
        per_layer = [self.hidden, q, self.hidden, self.intermediate]
        return per_layer * self.layers + ([self.hidden] if lm_head and not self.tied else [])

    def gram_bytes(self, lm_head: bool, dtype: str = "float32") -> int:
        return sum(n * n for n in self.distinct_inputs(lm_head)) * BYTES[dtype]

    def forward_flops_per_token(self, seq: int) -> float:
        linear = self.layers * sum(n * o for _, n, o in self.linears) + self.vocab * self.hidden
        attention = self.layers * 2 * seq * self.heads * self.head_dim  # QK^T and AV, causal: half of 2 x 2
        return 2 * linear + attention

    def gram_flops_per_token(self, lm_head: bool) -> float:
        return sum(2 * (e - s) * (n - s) for n in self.distinct_inputs(lm_head) for s, e in panel_bounds(n))

    def merge_peak_bytes(self, experts: int, lm_head: bool, solver_dtype: str = "float32", *, solves: bool = True) -> int:
        s = BYTES[solver_dtype]
        largest = 4 * max([self.vocab * self.hidden] + [n * o for _, n, o in self.linears])
        streamed = (experts + 2) * min(largest, BLOCK_BYTES)
        if not solves:
            return RUNTIME_BYTES + streamed
        solved = [(n, o) for _, n, o in self.linears] + ([(self.hidden, self.vocab)] if lm_head and not self.tied else [])
        regmean = max(2 * n * n * s + (experts + 3) * min(o * n * 4, BLOCK_BYTES) for n, o in solved)
        return RUNTIME_BYTES + max(regmean, streamed)


def read_config(source: str, params: Params, name: str) -> tuple[dict, str]:
    """`config.json` of the base (`name == "base"`) or an expert, without touching weights."""
    m = params.models
    if source == "toy":
        from .zoo.tokenizer import build_tokenizer
        from .zoo.toy import MAX_LENGTH, toy_config

        tok = build_tokenizer(MAX_LENGTH * 2)
        return toy_config(m.toy, len(tok), tok).to_dict(), "toy zoo params"
    if source == "smollm2":  # the experts are fine-tuned copies of the base
        from .zoo.gguf import gguf_config, locate_gguf

        path = locate_gguf(m.smollm2.file, m.smollm2.package)
        return gguf_config(path), str(path)
    if source == "local":
        path = m.local.base if name == "base" else m.local.experts.get(name)
        if path is None:
            raise ValueError(f"params: models.local.{'base' if name == 'base' else 'experts.' + name} is not set")
        path = Path(path)
        if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
            return read_config(source, params, "base")  # a LoRA adapter: materialised with the base's shapes
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (params: models.local)")
        return json.loads((path / "config.json").read_text()), str(path / "config.json")
    model = m.hub.base if name == "base" else m.hub.experts.get(name)
    if model is None:
        raise ValueError(f"params: models.hub.{'base' if name == 'base' else 'experts.' + name} is not set")
    path = hub_config(model)
    config = json.loads(path.read_text())
    if "peft_type" in config:
        return read_config(source, params, "base")
    return config, f"{model.repo_id}@{model.revision}"


def hub_config(model: HubModel) -> Path:
    """config.json (or adapter_config.json) of a hub repo: from the cache, else fetched alone."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for filename in ("config.json", "adapter_config.json"):
        cached = try_to_load_from_cache(model.repo_id, filename, revision=model.revision)
        if isinstance(cached, str):
            return Path(cached)
    for filename in ("config.json", "adapter_config.json"):
        try:
            return Path(hf_hub_download(model.repo_id, filename, revision=model.revision))
        except EntryNotFoundError:
            continue
        except LocalEntryNotFoundError:
            break
    raise FileNotFoundError(
        f"{model.repo_id}@{model.revision}: config.json is not in the Hugging Face cache and the hub cannot be reached; "
        f"fetch it with `hf download {model.repo_id} config.json --revision {model.revision}`"
    )


def count_rows(path: Path) -> Optional[int]:
    if path.suffix == ".jsonl" and path.is_file():
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return None


def machine() -> dict:
    import psutil

    info = {"ram_bytes": psutil.virtual_memory().total, "cpus": os.cpu_count(), "disk_free_bytes": shutil.disk_usage(".").free, "gpus": []}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    except Exception:  # no usable CUDA runtime: a CPU machine
        pass
    return info


def make_plan(params: Params, *, tflops: float, root: Path = Path(".")) -> dict:
    """The plan as data: per stage disk, FLOPs, time and memory, and what fits this machine."""
    source = params.models.source
    base_config, where = read_config(source, params, "base")
    shape = Shape.from_config(base_config, where)
    for expert in params.experts:  # every expert must share the base's architecture
        cfg, at = read_config(source, params, expert)
        other = Shape.from_config(cfg, at)
        if (other.hidden, other.intermediate, other.layers, other.vocab) != (shape.hidden, shape.intermediate, shape.layers, shape.vocab):
            raise ValueError(f"{at}: expert {expert!r} has other shapes than the base ({where}); all experts must share one architecture")
    g = params.gram
    lm_head = g.include_lm_head
    experts = len(params.experts)
    model_bytes = shape.model_bytes()
    stages: dict[str, dict] = {"download": {"disk_bytes": model_bytes * (experts + 1)}}
    for expert in params.experts:
        rows = g.num_samples
        if rows is None:
            zoo = {"toy": params.models.toy.calib_samples, "smollm2": params.models.smollm2.calib_samples}
            rows = count_rows(root / "data" / "calib" / f"{expert}.jsonl") or zoo.get(source)
        tokens = rows * g.max_length if rows else None  # an upper bound: texts may be shorter
        flops = tokens * (shape.forward_flops_per_token(g.max_length) + shape.gram_flops_per_token(lm_head)) if tokens else None
        stages[f"gram@{expert}"] = {
            "disk_bytes": shape.gram_bytes(lm_head, g.dtype), "rows": rows, "max_tokens": tokens, "flops": flops,
            "hours": flops / (tflops * 1e12) / 3600 if flops else None,
            "device_bytes": shape.model_bytes(g.model_dtype) + (shape.gram_bytes(lm_head, g.dtype) if g.accumulate_on == "device" else 0),
        }
    regmean = params.method == "regmean"
    peak = shape.merge_peak_bytes(experts, regmean and params.merge.regmean_lm_head, params.merge.method_value("solver_dtype"), solves=regmean)
    stages["merge"] = {"disk_bytes": model_bytes, "peak_memory_bytes": peak}
    stages["evaluate"] = {"device_bytes": shape.model_bytes("bfloat16")}
    here = machine()
    disk = sum(s.get("disk_bytes", 0) for s in stages.values())  # the DVC cache links these files (.dvc/config): no second copy
    fits = {
        "merge_in_ram": stages["merge"]["peak_memory_bytes"] < here["ram_bytes"],
        "grams_on_gpu": None if not here["gpus"] else max(s.get("device_bytes", 0) for k, s in stages.items() if k.startswith("gram@")) < max(here["gpus"]),
        "disk": disk < here["disk_free_bytes"],
    }
    return {"model": where, "shape": shape.__dict__, "parameters": shape.parameters, "stages": stages, "total_disk_bytes": disk,
            "tflops": tflops, "machine": here, "fits": fits}


def gb(n: Optional[float]) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def format_plan(plan: dict) -> str:
    s = plan["shape"]
    lines = [
        f"model: {plan['model']}: {plan['parameters'] / 1e6:,.1f}M parameters, {s['layers']} layers, hidden {s['hidden']}, "
        f"intermediate {s['intermediate']}, vocabulary {s['vocab']}, {s['dtype']}{', tied embeddings' if s['tied'] else ''}",
        f"{'stage':<22}{'writes':>14}{'gram TFLOP':>14}{'time @ ' + str(plan['tflops']) + ' TFLOPS':>24}{'memory':>16}",
    ]
    for name, st in plan["stages"].items():
        time = "" if st.get("hours") is None else (f"{st['hours']:,.2f} h" if st["hours"] >= 1 else f"{st['hours'] * 3600:,.0f} s")
        flop = "" if st.get("flops") is None else (f"{st['flops'] / 1e12:,.0f}" if st["flops"] >= 1e15 else f"{st['flops'] / 1e12:,.3g}")
        memory = gb(st.get("peak_memory_bytes") or st.get("device_bytes")) if ("peak_memory_bytes" in st or "device_bytes" in st) else ""
        lines.append(f"{name:<22}{gb(st.get('disk_bytes')) if 'disk_bytes' in st else '':>14}{flop:>14}{time:>24}{memory:>16}")
    m = plan["machine"]
    gpus = ", ".join(gb(x) for x in m["gpus"]) or "none"
    lines += [
        f"total disk: {gb(plan['total_disk_bytes'])} (free here: {gb(m['disk_free_bytes'])})",
        f"this machine: {m['cpus']} CPUs, {gb(m['ram_bytes'])} RAM, GPUs: {gpus}",
        "fits: " + ", ".join(f"{k.replace('_', ' ')}: {'no GPU here' if v is None else 'yes' if v else 'NO'}" for k, v in plan["fits"].items()),
        "gram rows x max_length is an upper bound on tokens; time assumes the given effective throughput (--tflops).",
    ]
    return "\n".join(lines)
