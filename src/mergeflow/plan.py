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
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .model_files import BLOCK_BYTES, CONFIG, STREAM_BYTES, NAMED_DTYPES, is_tied, model_config, require_model_dir, torch_dtype
from .grams.accumulate import panel_bounds
from .params import HubModel, Params

log = logging.getLogger(__name__)
RUNTIME_BYTES = 300 * 2**20  # Python, torch and the libraries


def element_size(dtype: str) -> int:
    """Bytes per weight of a config's `torch_dtype`; 4 for a dtype mergeflow does not name (int8...)."""
    return torch_dtype(dtype).itemsize if dtype in NAMED_DTYPES else 4


@dataclass(frozen=True)
class Shape:
    """The sizes the costs depend on, for any transformers architecture: read from the model that
    config.json describes, built with fake tensors (no weights, no memory), its solved modules
    found as `mergeflow grams` finds them and their shared inputs learnt by a fake forward pass."""

    family: str
    layers: int
    hidden: int
    vocab: int
    tied: bool
    dtype: str
    parameters: int
    solved: tuple[tuple[int, int], ...]  # (in, out) of every block Linear RegMean solves
    inputs: tuple[int, ...]              # widths of their distinct inputs: one gram each
    attention: int                       # layers x heads x head_dim, the attention FLOPs' factor

    @classmethod
    def from_config(cls, config: dict, where: str) -> "Shape":
        from transformers import AutoConfig

        try:
            cfg = AutoConfig.for_model(**config) if "model_type" in config else None
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{where}: transformers cannot build a model of this config ({err})") from None
        if cfg is None:
            raise ValueError(f"{where}: config lacks 'model_type'; mergeflow plan needs a transformers config.json")
        text = cfg.get_text_config()
        try:
            hidden, heads, layers = text.hidden_size, text.num_attention_heads, text.num_hidden_layers
        except AttributeError as err:
            raise ValueError(f"{where}: config lacks {err.name!r}; mergeflow plan needs a transformer's sizes") from None
        solved, keys, parameters = probe_architecture(cfg, where)
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        return cls(
            family=cfg.model_type, layers=layers, hidden=hidden, vocab=text.vocab_size,
            tied=is_tied(config),
            dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"), parameters=parameters,
            solved=tuple((m.in_features, m.out_features) for m in solved.values()),
            inputs=tuple(solved[k].in_features for k in dict.fromkeys(keys.values())), attention=layers * heads * head_dim,
        )

    def model_bytes(self, dtype: Optional[str] = None) -> int:
        return self.parameters * element_size(dtype or self.dtype)

    def distinct_inputs(self, lm_head: bool) -> list[int]:
        """Widths of the distinct Linear inputs grams are kept for (q/k/v share one, gate/up one)."""
        return list(self.inputs) + ([self.hidden] if lm_head and not self.tied else [])

    def gram_bytes(self, lm_head: bool, dtype: str = "float32") -> int:
        return sum(n * n for n in self.distinct_inputs(lm_head)) * torch_dtype(dtype).itemsize

    def forward_flops_per_token(self, seq: int) -> float:
        linear = sum(n * o for n, o in self.solved) + self.vocab * self.hidden
        attention = 2 * seq * self.attention  # QK^T and AV, causal: half of 2 x 2
        return 2 * linear + attention

    def gram_flops_per_token(self, lm_head: bool) -> float:
        return sum(2 * (e - s) * (n - s) for n in self.distinct_inputs(lm_head) for s, e in panel_bounds(n))

    def merge_peak_bytes(self, experts: int, lm_head: bool, solver_dtype: str = "float32", *, solves: bool = True) -> int:
        s = torch_dtype(solver_dtype).itemsize
        largest = 4 * max([self.vocab * self.hidden] + [n * o for n, o in self.solved])
        streamed = max((experts + 2) * min(largest, BLOCK_BYTES), STREAM_BYTES)  # average's blocks; the data-free methods' working sets
        if not solves:
            return RUNTIME_BYTES + streamed
        solved = list(self.solved) + ([(self.hidden, self.vocab)] if lm_head and not self.tied else [])
        regmean = max(2 * n * n * s + (experts + 3) * min(o * n * 4, BLOCK_BYTES) for n, o in solved)
        return RUNTIME_BYTES + max(regmean, streamed)


def probe_architecture(config, where: str) -> tuple[dict, dict[str, str], int]:
    """(solved modules, module -> shared-input key, parameter count) of a model of `config`, built
    and run on fake tensors (torch's FakeTensorMode: shapes only), so an 8B model costs seconds."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .grams.accumulate import causal_inputs, probe
    from .grams.modules import auto_class, discover

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = auto_class(config).from_config(config)
        solved = discover(model, where=where).solved
        parameters = sum(p.numel() for p in model.parameters())
        ids, mask = torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)
        inputs, masks = causal_inputs(ids, mask), {"tokens": mask}
        if getattr(config, "is_encoder_decoder", False):  # the decoder 3 tokens long: each module's stream shows
            decoder = torch.ones(1, 3, dtype=torch.long)
            inputs, masks = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder}, {"encoder": mask, "decoder": decoder}
        if hasattr(model, "set_experts_implementation"):  # fused MoE kernels want real dtypes; the eager loop runs on fake tensors
            try:
                model.set_experts_implementation("eager")
            except (ValueError, AttributeError):
                pass
        try:
            keys, _, _ = probe(model, {n: m.module for n, m in solved.items()}, inputs, masks)
        except Exception as err:  # a model whose forward needs more than ids (an encoder-decoder): no sharing assumed, an upper bound
            log.warning("%s: a shape-only forward pass failed (%s: %s); counting one gram per Linear, an upper bound", where, type(err).__name__, err)
            keys = {n: n for n in solved}
    return solved, keys, int(parameters)


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
        if not (path / CONFIG).is_file() and (path / "adapter_config.json").is_file():
            return read_config(source, params, "base")  # a LoRA adapter: materialised with the base's shapes
        require_model_dir(path, "expected a Hugging Face model directory (params: models.local)")
        return model_config(path), str(path / CONFIG)
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
        if (other.family, other.solved, other.vocab) != (shape.family, shape.solved, shape.vocab):
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
        f"model: {plan['model']}: {s['family']}, {plan['parameters'] / 1e6:,.1f}M parameters, {s['layers']} layers, hidden {s['hidden']}, "
        f"{len(s['solved'])} Linears solved ({len(s['inputs'])} distinct inputs), vocabulary {s['vocab']}, {s['dtype']}{', tied embeddings' if s['tied'] else ''}",
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
