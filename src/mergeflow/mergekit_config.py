"""mergekit configs: read a mergekit 0.1.5 merge YAML as a mergeflow merge.

Users bring the configs they already have (`mergeflow merge --config mergekit.yml OUT`, or a
`merge.mergekit` block in a recipe with `method: mergekit`). The translation is exact or refused:

- the method's name maps to ours (`linear` -> `average`, the rest keep their names);
- each mergekit parameter maps to one of ours by name (`weight` -> `weights`, one per expert;
  `lambda` -> `scaling`; the rest keep their names). Parameters mergekit does not give are set to
  mergekit's defaults (TIES' `density` is 1.0 there, 0.2 here), so the result is mergekit's;
- per-model values become per-expert lists where our parameter is per expert, and must agree
  across models where it is not (our TIES takes one density);
- gradients (`[0, 0.5, 1]`) stay lists, interpolated over the layers as mergekit does; filters
  (`[{filter: self_attn, value: 0.3}, {value: 0.5}]`) become `{self_attn: 0.3, "*": 0.5}`;
- mergekit knobs whose effect our method always has (`linear`'s `normalize: true`), or never
  changes the result (`int8_mask`, the dtype of mergekit's masks), are dropped; any other key
  mergeflow does not share is refused by name, in one line, before anything is written.

Models are local model directories (or, in a recipe, expert names and `base`); `slices` are
accepted only as one slice taking every layer of every model (the same as `models`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import yaml

REQUIRED = object()  # a mergekit parameter without a default
# mergekit 0.1.5's parameters: name -> (default, scope), scope "model" (per model) or "shared"
_GTA = {"int8_mask": (False, "shared"), "lambda": (1.0, "shared"), "weight": (REQUIRED, "model"), "density": (1.0, "model")}


def _gta(normalize: bool, rescale: bool, **extra) -> dict[str, tuple[Any, str]]:
    return {**_GTA, "normalize": (normalize, "shared"), "rescale": (rescale, "shared"), **{k: (v, "model") for k, v in extra.items()}}


@dataclass(frozen=True)
class MergekitMethod:
    """One mergekit method: our method's name, mergekit's parameters, and how the base is used
    (`required`, `optional`, or `ignored`: mergekit merges only the `models` then)."""

    ours: str
    params: dict[str, tuple[Any, str]]
    base: str = "required"
    base_first: bool = False  # SLERP: the base is the first of the two models (t = 0 gives it)
    # values of our method's own params that make it compute what mergekit does (where declared)
    fixed: dict[str, Any] = field(default_factory=dict)


MERGEKIT_METHODS: dict[str, MergekitMethod] = {
    "linear": MergekitMethod("average", {"weight": (REQUIRED, "model"), "normalize": (True, "shared")}, base="ignored"),
    "task_arithmetic": MergekitMethod("task_arithmetic", _gta(False, False)),
    "ties": MergekitMethod("ties", _gta(True, False), fixed={"convention": "mergekit"}),
    "dare_linear": MergekitMethod("dare_linear", _gta(False, True)),
    "dare_ties": MergekitMethod("dare_ties", _gta(False, True)),
    "breadcrumbs": MergekitMethod("breadcrumbs", _gta(False, False, gamma=0.01)),
    "breadcrumbs_ties": MergekitMethod("breadcrumbs_ties", _gta(False, False, gamma=0.01)),
    "della": MergekitMethod("della", _gta(True, True, epsilon=0.15)),
    "della_linear": MergekitMethod("della_linear", _gta(False, True, epsilon=0.15)),
    "slerp": MergekitMethod("slerp", {"t": (REQUIRED, "shared")}, base_first=True),
    "nuslerp": MergekitMethod("nuslerp", {"weight": (REQUIRED, "model"), "nuslerp_row_wise": (False, "shared"), "nuslerp_flatten": (True, "shared")}, base="optional"),
    "model_stock": MergekitMethod("model_stock", {"filter_wise": (False, "shared")}),
    "sce": MergekitMethod("sce", {"int8_mask": (False, "shared"), "select_topk": (1.0, "shared")}),
    "karcher": MergekitMethod("karcher", {"max_iter": (10, "shared"), "tol": (1e-5, "shared")}, base="ignored"),
}
RENAMES = {"weight": "weights", "lambda": "scaling"}
DROPPED = {"int8_mask"}  # the dtype of mergekit's 0/1 masks: no effect on the result
# mergekit parameters our method does not declare because it always behaves one way: the value it
# implies (ANY: mergekit ignores the parameter for this method, e.g. density without sparsification)
ANY = object()
IMPLIED: dict[str, dict[str, Any]] = {
    "average": {"normalize": True},
    "task_arithmetic": {"normalize": False, "rescale": ANY, "density": ANY},
    "ties": {"normalize": True, "rescale": False},
}
TOP_LEVEL = {"models", "slices", "base_model", "merge_method", "parameters", "dtype", "tokenizer_source"}
UNSUPPORTED_TOP = {
    "modules": "per-module sub-merges", "tokenizer": "tokenizer surgery", "chat_template": "chat template replacement",
    "out_dtype": "an output dtype other than the experts' own",
}


@dataclass
class Translation:
    """A mergekit config as a mergeflow merge: method, its parameter values, the model references
    (as written in the config) in merge order, and the checks left to the caller."""

    method: str
    values: dict[str, Any]
    experts: list[str]
    base: Optional[str]
    base_model: Optional[str]  # as given, even where the method ignores it (tokenizer_source)
    dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    layer_range: Optional[tuple[int, int]] = None  # from `slices`: must cover every layer
    dropped: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # where each expert is given (`models[1]`), for messages


class ConfigError(ValueError):
    """A config mergeflow cannot run exactly; the message names the key."""


def read_config(path: str | Path) -> dict:
    """The YAML mapping in `path`; syntax errors as one line naming the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())}); fix the file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mergekit config (a mapping with merge_method, models, ...), got {type(raw).__name__}")
    return raw


def _declared(method: str) -> dict[str, bool]:
    """Our method's parameter names -> whether each is per expert."""
    from .methods import get_method

    return {p.name: p.per_expert for p in get_method(method).params}


def _setting(value: Any, key: str, default: Any) -> Any:
    """A mergekit parameter setting as ours: scalar, gradient list, or {filter: value} mapping."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value):
        if not value:
            raise ConfigError(f"{key}: an empty list; give a value or a gradient of at least one value")
        return list(value)
    conditions = [value] if isinstance(value, dict) else value
    if not isinstance(conditions, list) or not all(isinstance(c, dict) for c in conditions):
        raise ConfigError(f"{key}: expected a number, a gradient list or filter entries ({{filter: ..., value: ...}}), got {value!r}")
    mapping: dict[str, Any] = {}
    for i, cond in enumerate(conditions):
        extra = set(cond) - {"filter", "value"}
        if extra:
            raise ConfigError(f"{key}[{i}].{sorted(extra)[0]}: unsupported key; a filter entry has `filter` (a substring of tensor names) and `value`")
        if "value" not in cond:
            raise ConfigError(f"{key}[{i}]: a filter entry needs a `value`")
        pattern = cond.get("filter") or "*"
        inner = _setting(cond["value"], f"{key}[{i}].value", default)
        if pattern == "*":
            mapping["*"] = inner
            break  # mergekit takes the first entry that matches: nothing after a catch-all is reached
        mapping.setdefault(pattern, inner)
    if "*" not in mapping and default is not REQUIRED:
        mapping["*"] = default  # tensors no filter matches take mergekit's default, not ours
    return mapping


def _models(raw: dict) -> tuple[list[tuple[str, dict, str]], Optional[tuple[int, int]]]:
    """[(reference, parameters, key path)] of `models`, or of `slices` when it is one full slice."""
    if ("models" in raw) == ("slices" in raw):
        raise ConfigError("models: give exactly one of `models` and `slices`")
    if "models" in raw:
        entries, where, layer_range = raw["models"], "models", None
    else:
        slices = raw["slices"]
        if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
            raise ConfigError("slices: only one slice is supported (every layer of every model: the same as `models`); "
                              "layer stacking (frankenmerges) is not")
        extra = set(slices[0]) - {"sources"}
        if extra:
            raise ConfigError(f"slices[0].{sorted(extra)[0]}: unsupported key; move parameters to the top-level `parameters`")
        entries, where = slices[0].get("sources"), "slices[0].sources"
        ranges = {tuple(s.get("layer_range") or ()) for s in entries or () if isinstance(s, dict)}
        if len(ranges) != 1 or len(next(iter(ranges))) != 2:
            raise ConfigError(f"{where}: every source needs the same layer_range [0, number of layers]; mixing layers is not supported")
        layer_range = next(iter(ranges))
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: expected a list of {{model: ..., parameters: ...}} entries")
    out = []
    allowed = {"model", "parameters"} | ({"layer_range"} if where != "models" else set())
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{where}[{i}]: expected a mapping with `model`")
        extra = set(entry) - allowed
        if extra:
            raise ConfigError(f"{where}[{i}].{sorted(extra)[0]}: unsupported key")
        ref = entry["model"]
        if not isinstance(ref, str) or "+" in ref:
            raise ConfigError(f"{where}[{i}].model: {ref!r}: only a model directory (or expert name) is supported, not a LoRA reference or mapping; "
                              "merge the adapter into its base first")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{where}[{i}].parameters: expected a mapping, got {params!r}")
        out.append((ref, params, f"{where}[{i}]"))
    return out, layer_range


def _inputs(spec: MergekitMethod, name: str, models: list[tuple[str, dict, str]], base_model: Optional[str]) -> tuple[list[tuple[str, dict, str]], Optional[str]]:
    """The models merged as experts (in merge order) and the base the method reads (or None)."""
    if spec.base == "ignored":
        return models, None
    if base_model is None and spec.base == "required":
        raise ConfigError(f"base_model: mergekit's {name} needs the base model the others were fine-tuned from; add `base_model:`")
    others = [m for m in models if m[0] != base_model]
    if spec.base_first:  # SLERP interpolates from the base (t = 0) to the other model (t = 1)
        if len(others) != 1:
            raise ConfigError(f"models: {name} merges exactly two models, the base_model and one other; got {len(others)} besides the base")
        return [(base_model, {}, "base_model"), others[0]], None
    return others, base_model


def _per_model(name: str, spec_default: Any, models: list[tuple[str, dict, str]], shared: dict) -> list[Any]:
    """The value of per-model parameter `name` for each model (its own, else the top-level one)."""
    out = []
    for _, params, key in models:
        value = params.get(name, shared.get(name, spec_default))
        if value is REQUIRED:
            raise ConfigError(f"{key}.parameters.{name}: required by mergekit (no default); add it here or under the top-level `parameters`")
        out.append(_setting(value, f"{key}.parameters.{name}" if name in params else f"parameters.{name}", spec_default))
    return out


def _check_keys(spec: MergekitMethod, name: str, shared: dict, models: list[tuple[str, dict, str]], declared: Mapping[str, bool]) -> None:
    """Refuse parameter names neither mergekit's method nor ours has, and shared ones given per model."""
    own = set(declared) - {RENAMES.get(k, k) for k in spec.params}  # mergeflow-only parameters (e.g. seed) may be given too
    for key in shared:
        if key not in spec.params and key not in own:
            raise ConfigError(f"parameters.{key}: not a parameter of mergekit's {name} (it has {', '.join(sorted(spec.params))}); remove it")
    for _, params, where in models:
        for key in params:
            if spec.params.get(key, (None, "shared"))[1] != "model":
                what = "a parameter of the whole merge: move it to the top-level `parameters`" if key in spec.params or key in own else (
                    f"not a per-model parameter of mergekit's {name}")
                raise ConfigError(f"{where}.parameters.{key}: {what}")


def _collapse(values: list[Any], name: str, ours: str, models: list[tuple[str, dict, str]]) -> Any:
    """One value for a per-model mergekit parameter our method takes once for all experts."""
    for value, (_, _, key) in zip(values[1:], models[1:]):
        if value != values[0]:
            raise ConfigError(f"{key}.parameters.{name}: {value!r} differs from {values[0]!r} of {models[0][2]}; mergeflow's {ours} takes one "
                              f"{name} for all experts: give the same value to every model")
    return values[0]


def _values(spec: MergekitMethod, name: str, raw_shared: Any, models: list[tuple[str, dict, str]]) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Our method's values, the mergekit parameters dropped, and those left to `_implied`."""
    shared = raw_shared or {}
    if not isinstance(shared, dict):
        raise ConfigError(f"parameters: expected a mapping, got {shared!r}")
    declared = _declared(spec.ours)
    _check_keys(spec, name, shared, models, declared)
    values: dict[str, Any] = {}
    dropped: list[str] = []
    implied: dict[str, Any] = {}
    for key, (default, scope) in spec.params.items():
        if scope == "model":
            per_model = _per_model(key, default, models, shared)
        else:
            if shared.get(key, default) is REQUIRED:
                raise ConfigError(f"parameters.{key}: required by mergekit's {name} (no default); add it")
            value = _setting(shared.get(key, default), f"parameters.{key}", default)
        ours = RENAMES.get(key, key)
        if key in DROPPED:
            dropped.append(key)
        elif ours in declared and declared[ours]:
            values[ours] = per_model if scope == "model" else [value] * len(models)
        elif ours in declared:
            values[ours] = _collapse(per_model, key, spec.ours, models) if scope == "model" else value
        else:
            implied[key] = (_collapse(per_model, key, spec.ours, models) if scope == "model" else value)
    for key, value in shared.items():  # mergeflow-only parameters (seed, ...) as given
        if key not in spec.params:
            values[key] = [value] * len(models) if declared.get(key) else value
    return values, dropped, implied


def _scalar_weights(values: dict, why: str) -> list[float]:
    weights = values.get("weights")
    if not weights or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise ConfigError(f"models: {why} needs one number as `weight` per model (no gradients or filters)")
    return [float(w) for w in weights]


def _implied(spec: MergekitMethod, name: str, values: dict, implied: dict) -> list[str]:
    """Check the mergekit parameters our method has no knob for against the behaviour it always
    has; turn the few exact equivalents into ours; return the names dropped."""
    dropped = []
    always = IMPLIED.get(spec.ours, {})
    for key, value in implied.items():
        behaviour = always.get(key, REQUIRED)
        if behaviour is ANY or (behaviour is not REQUIRED and behaviour == value):
            dropped.append(key)
        elif spec.ours == "task_arithmetic" and key == "normalize" and value is True:
            weights = _scalar_weights(values, "normalize: true")  # sum_i (w_i / W) tau_i: the weights normalised
            values["weights"] = [w / sum(weights) for w in weights]
            dropped.append(key)
        else:
            how = f"; it always behaves as {key}: {behaviour!r}" if behaviour is not REQUIRED else ""
            raise ConfigError(f"parameters.{key}: {value!r} is not supported by mergeflow's {spec.ours} (mergekit's {name}){how}; remove the key or change the value")
    if spec.ours == "ties" and "normalize" in dropped and "weights" in values and "convention" not in values:
        # mergekit divides by the agreeing entries' summed weights, ours by their count: equal for equal weights
        weights = _scalar_weights(values, "ties")
        if len(set(weights)) != 1:
            raise ConfigError(f"models: ties with different weights {weights}: mergekit divides by the agreeing models' summed weights, mergeflow's "
                              "ties by their count; give every model the same weight")
        values["weights"] = [1.0] * len(weights)
    return dropped


def translate(raw: Mapping[str, Any]) -> Translation:
    """A parsed mergekit config as a mergeflow merge; refuses what it cannot run exactly."""
    unknown = sorted(set(raw) - TOP_LEVEL)
    if unknown:
        why = UNSUPPORTED_TOP.get(unknown[0], "not a key of mergekit 0.1.5's merge config")
        raise ConfigError(f"{unknown[0]}: unsupported key ({why}); remove it")
    name = raw.get("merge_method")
    if name not in MERGEKIT_METHODS:
        raise ConfigError(f"merge_method: {name!r} is not a mergekit method mergeflow shares; supported: {', '.join(MERGEKIT_METHODS)}")
    spec = MERGEKIT_METHODS[name]
    from .methods import available

    if spec.ours not in available():
        raise ConfigError(f"merge_method: {name!r} would be mergeflow's {spec.ours!r}, which this version lacks; available: {', '.join(available())}")
    base_model = raw.get("base_model")
    if base_model is not None and (not isinstance(base_model, str) or "+" in base_model):
        raise ConfigError(f"base_model: {base_model!r}: only a model directory (or `base`) is supported, not a LoRA reference or mapping")
    models, layer_range = _models(dict(raw))
    inputs, base = _inputs(spec, name, models, base_model)
    values, dropped, implied = _values(spec, name, raw.get("parameters"), inputs)
    declared = _declared(spec.ours)
    values.update({k: v for k, v in spec.fixed.items() if k in declared})
    if spec.ours == "nuslerp" and "use_base" in declared:  # mergekit's nuslerp interpolates task vectors when given a base
        values["use_base"] = base is not None
    dropped += _implied(spec, name, values, implied)
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    tokenizer_source = raw.get("tokenizer_source")
    if tokenizer_source not in (None, "base"):
        raise ConfigError(f"tokenizer_source: {tokenizer_source!r} is not supported (mergeflow keeps the models' shared tokenizer); remove it or use `base`")
    if tokenizer_source == "base" and base_model is None:
        raise ConfigError("tokenizer_source: `base` needs a base_model")
    return Translation(spec.ours, values, [m[0] for m in inputs], base, base_model, DTYPES.get(dtype), tokenizer_source, layer_range, dropped, [m[2] for m in inputs])


DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# the files mergekit copies from the base model (its tokenizer donor) into the merged model
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "added_tokens.json", "merges.txt", "chat_template.jinja")


def build_method(translation: Translation):
    """Our method, built from the translated values (validated by the method's declaration)."""
    from .methods import get_method

    from .methods import ParamError

    try:
        return get_method(translation.method)(translation.values)
    except ParamError as err:  # named as the config names it: `weight`, `lambda`
        theirs = {v: k for k, v in RENAMES.items()}.get(err.param, err.param)
        raise ConfigError(f"parameters.{theirs}: {err}") from None


def check_models(translation: Translation, experts: list[Path], base_model: Optional[Path]) -> None:
    """What the translation leaves to the models: `dtype`, a slice's layer range, the tokenizer."""
    from .model_files import CheckpointReader
    from .merge import model_config

    stored = {str(s.dtype).removeprefix("torch.") for s in CheckpointReader(experts[0]).specs.values() if s.dtype.is_floating_point}
    if translation.dtype and stored != {translation.dtype}:
        raise ConfigError(f"dtype: {translation.dtype} but {experts[0]} stores {', '.join(sorted(stored))}; mergeflow computes in float32 and "
                          "writes the experts' own dtype: set dtype to it or remove the key")
    if translation.layer_range:
        layers = model_config(experts[0]).get("num_hidden_layers")
        if list(translation.layer_range) != [0, layers]:
            raise ConfigError(f"slices[0].sources: layer_range {list(translation.layer_range)} but {experts[0]} has {layers} layers; only "
                              f"[0, {layers}] (every layer) is supported")
    if base_model is not None:  # mergekit copies the base's tokenizer, mergeflow the first expert's: they must be the same
        for name in TOKENIZER_FILES:
            a, b = base_model / name, experts[0] / name
            if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
                raise ConfigError(f"base_model: its {name} differs from {experts[0]}'s; mergekit's output takes the base model's tokenizer, "
                                  "mergeflow's the first model's: merge models that share the base's tokenizer")


def plan_config(raw: Mapping[str, Any], resolve: Callable[[str, str], Path]) -> tuple[Any, list[Path], Optional[Path]]:
    """Translate `raw`, find its models with `resolve(reference, key)`, check them; return the
    built method, the expert directories in merge order and the base directory (or None)."""
    translation = translate(raw)
    experts = [resolve(ref, "base_model" if key == "base_model" else f"{key}.model") for ref, key in zip(translation.experts, translation.keys)]
    base_model = resolve(translation.base_model, "base_model") if translation.base_model is not None else None
    check_models(translation, experts, base_model)
    return build_method(translation), experts, base_model if translation.base is not None else None


def local_dir(reference: str, key: str) -> Path:
    """A model reference of a config given on the command line: a local directory (as mergekit,
    relative to the current directory)."""
    path = Path(reference).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {reference!r} is not a local model directory (no config.json there); download it first "
                          f"(e.g. `huggingface-cli download {reference} --local-dir DIR`) and give the directory")
    return path


def merge_from_config(config: str | Path, out: str | Path, **merge_kwargs) -> dict:
    """`mergeflow merge --config FILE OUT`: merge as the mergekit config `config` says."""
    from .merge import merge_models

    try:
        method, experts, base = plan_config(read_config(config), local_dir)
    except ConfigError as err:
        raise ConfigError(str(err) if str(err).startswith(f"{config}:") else f"{config}: {err}") from None
    except ValueError as err:  # a value the method's declaration refuses
        raise ConfigError(f"{config}: {err}") from None
    return merge_models(experts, method, out, base=base, **merge_kwargs)


BASE = "base"  # in a recipe's block, the pipeline's base model (models/base)


def check_block(block: Optional[Mapping[str, Any]], experts: list[str]) -> Translation:
    """A recipe's `merge.mergekit` block (for `method: mergekit`): it must translate, and name as
    models exactly the pipeline's `experts` (and `base`), the models the merge stage depends on."""
    if not block:
        raise ConfigError("method: mergekit needs a mergekit config under merge.mergekit (models: expert names and `base`)")
    try:
        translation = translate(block)
    except ConfigError as err:
        raise ConfigError(f"merge.mergekit.{err}") from None
    named = [m for m in translation.experts if m != BASE]
    if sorted(named) != sorted(experts) or (translation.base_model not in (None, BASE)):
        raise ConfigError(f"merge.mergekit: merges {named} (base_model {translation.base_model!r}) but `experts` lists {experts}; "
                          f"name the pipeline's experts and `{BASE}` as its models")
    return translation


def plan_block(block: Mapping[str, Any], experts: list[str], experts_dir: Path, base_dir: Path) -> tuple[Any, list[Path], Optional[Path]]:
    """The merge stage's method, expert directories and base for a recipe's `merge.mergekit`."""
    check_block(block, experts)
    try:
        return plan_config(block, lambda ref, key: base_dir if ref == BASE else experts_dir / ref)
    except ValueError as err:  # ConfigError, or a value the method's declaration refuses
        raise ConfigError(f"merge.mergekit.{err}" if isinstance(err, ConfigError) else f"merge.mergekit: {err}") from None
