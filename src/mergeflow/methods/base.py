"""The interface every merge method implements, and the parameters it declares.

A method merges one tensor at a time. The engine streams each tensor of the experts (same name,
same shape, in the experts' order) and, when the method asks for them, the base model's tensor
(`uses_base`) and handles of the per-token mean grams of the Linear that owns the tensor
(`uses_grams`). A `row_separable` method computes each output row from the same rows of its
inputs, so the engine may hand it a huge tensor (a 128256-row embedding) one block of rows at a
time (blocks of about `BLOCK_BYTES` in float32); other methods get whole tensors.

The streaming protocol bounds a method's memory by a few row blocks, whatever the tensor, also
for methods that need numbers of the whole tensor (norms, angles, magnitude ranks):

- `block_copies(inputs)`: how many float32 copies of one block the method holds at its peak,
  its `inputs` (experts and base) upcast included. A method returning a number (None: not
  streaming, as above) gets blocks of rows sized so that all those copies fit `STREAM_BYTES`
  (`model_files.py`): the larger its working set, the smaller its blocks. Blocks follow from shapes and
  constants only, never from the machine, so results do not change from one machine to another.
- `statistics(name, shape)`: None, or a `streaming.Statistics` the engine feeds every block of
  the tensor, `passes` times over, before merging them; `merge` then receives it as `stats=`
  (and must gather it itself, `streaming.gather`, when called on whole tensors without it).

A plugin that declares neither keeps the old contract (whole tensors, or row blocks when
`row_separable`), so `merge(stats=...)` is passed only to methods whose `statistics` returned one.

Adding a method is one small file with one subclass decorated with `@register`, or a file of
your own passed as `method: path/to/file.py:ClassName` (see `methods/__init__.py`). A method
declares the knobs it reads once, as `Param`s; params validation, the `mergeflow merge` options,
`mergeflow methods --describe`, `mergeflow_merge.json` and the model card all come from there.

A numeric value may be given per layer, as mergekit's gradients do:

- a list `[v0, ..., vk]`: piecewise-linear over evenly spaced points in [0, 1]; the tensors of
  block i of n sit at t = i / (n - 1) (t = 1 when n = 1), every other tensor (embeddings, final
  norm, lm_head) at t = 0, exactly as mergekit 0.1.5 evaluates them;
- a mapping `{self_attn: 0.3, mlp: 0.7, "*": 0.5}`: the first key that is a substring of the
  tensor's name wins, `"*"` matches every tensor, and with no match the declared default holds.
  A mapping's values may themselves be lists (a gradient for the matching tensors).

int, bool and str entries of a list are picked (entry `int(t * (k - 1))` of k), not interpolated.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional, Sequence

import torch

from ..blocks import layer_index
from ..finite import check_finite

if TYPE_CHECKING:
    from ..model_files import CheckpointReader
    from ..grams import GramDir

GramLoader = Callable[[], torch.Tensor]


class ParamError(ValueError):
    """A bad parameter value, in one line; `param` names the parameter so that the edge (CLI,
    stage) can point at the option or the params.yaml key."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def layer_position(tensor: str, num_layers: int) -> float:
    """Where a tensor sits in [0, 1] for gradients (mergekit's convention, see the module doc)."""
    index = layer_index(tensor)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def interpolate(values: list, t: float) -> Any:
    """mergekit's gradient: piecewise-linear over evenly spaced points; bool/str entries picked."""
    if len(values) == 1:
        return values[0]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[i0]
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Param:
    """One knob of a merge method: params.yaml `merge.<name>` (`alpha`: top level), CLI `--<name>`."""

    name: str
    type: type  # float | int | bool | str
    default: Any
    help: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Optional[tuple] = None
    per_expert: bool = False  # a list, one entry per expert (e.g. weights)
    per_layer: bool = True  # a value may be a gradient list or a {module pattern: value} mapping

    def range_text(self) -> str:
        """`[0, 1]`, `(0, 1]`, `>= 0`, `one of float32, float64`, or '' when anything goes."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{_fmt(self.low)}, {_fmt(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_fmt(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_fmt(self.high)}"
        return ""

    def form_text(self) -> str:
        """The value's shape for help texts: `float`, `float per layer`, `list of float, one per expert`..."""
        text = self.type.__name__
        if self.per_layer:
            text += " (or per layer: list / {pattern: value})"
        return f"list of {text}, one per expert" if self.per_expert else text

    def check_scalar(self, value: Any, where: str) -> Any:
        """`value` as this param's type, range and choices allow, else a one-line ParamError."""
        ok = isinstance(value, self.type) and not (isinstance(value, bool) and self.type is not bool)
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ParamError(f"{where} must be a {self.type.__name__}, got {value!r}", self.name)
        if self.type is float and not math.isfinite(value):
            raise ParamError(f"{where} must be finite, got {value!r}", self.name)
        if self.choices is not None and value not in self.choices:
            raise ParamError(f"{where} must be {self.range_text()}, got {value!r}", self.name)
        if self.type in (int, float) and not self._in_range(value):
            raise ParamError(f"{where} must be in {self.range_text()}, got {value!r}" if self.low is not None and self.high is not None
                             else f"{where} must be {self.range_text()}, got {value!r}", self.name)
        return value

    def _in_range(self, value: float) -> bool:
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def check(self, value: Any, method: str = "") -> Any:
        """Validate a value as given (scalar, per-layer list or mapping, per-expert list) and return
        it normalised (ints as floats for float params, tuples as lists); None only when the
        default is None."""
        where = f"{method}: {self.name}" if method else self.name
        if value is None and self.default is None:
            return None
        if self.per_expert:
            if not isinstance(value, (list, tuple)) or not value:
                raise ParamError(f"{where} must be a list with one value per expert, got {value!r}", self.name)
            return [self._check_one(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return self._check_one(value, where)

    def _check_one(self, value: Any, where: str) -> Any:
        if isinstance(value, (list, tuple)) and self.per_layer:
            if not value:
                raise ParamError(f"{where} is an empty per-layer list; give at least one value", self.name)
            return [self.check_scalar(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, Mapping) and self.per_layer:
            out = {}
            for key, v in value.items():
                if not isinstance(key, str) or not key:
                    raise ParamError(f"{where} has a key {key!r}; keys are module-name patterns (e.g. self_attn, mlp, '*')", self.name)
                is_list = isinstance(v, (list, tuple))
                out[key] = self._check_one(v, f"{where}[{key!r}]") if is_list else self.check_scalar(v, f"{where}[{key!r}]")
            return out
        return self.check_scalar(value, where)

    def resolve(self, value: Any, tensor: str, num_layers: int) -> Any:
        """The scalar a checked value (not per-expert) takes for `tensor` of a model with
        `num_layers` blocks."""
        if isinstance(value, Mapping):
            for pattern, v in value.items():
                if pattern == "*" or pattern in tensor:
                    return self.resolve(v, tensor, num_layers)
            return self.default
        if isinstance(value, list):
            if layer_index(tensor) is not None and num_layers <= 0:
                raise RuntimeError(f"{self.name}: a per-layer value needs the layer count; call prepare(tensor_names) first")
            t = layer_position(tensor, num_layers)
            return float(interpolate(value, t)) if self.type is float else value[int(t * (len(value) - 1))]  # ints, bools, strs: picked
        return value

    def describe(self) -> dict:
        """What `mergeflow methods --describe` prints for this param."""
        return {"name": self.name, "type": self.form_text(), "default": self.default, "range": self.range_text(), "help": self.help}


WEIGHTS = Param(
    "weights", float, None, "one weight per expert, in the experts' order; null: equal", low=0.0, per_expert=True,
)


def check_values(method: type["MergeMethod"], values: Mapping[str, Any]) -> dict[str, Any]:
    """The values a user gave, each checked against `method`'s declaration; one ParamError line
    for an unknown name, a wrong type or a value out of range."""
    declared = {p.name: p for p in method.params}
    for key in values:
        if key not in declared:
            known = ", ".join(declared) or "no parameters"
            raise ParamError(f"{method.name}: unknown parameter {key!r}; {method.name} reads {known}", key)
    out = {key: declared[key].check(value, method.name) for key, value in values.items()}
    weights = out.get("weights")
    if weights is not None and all(isinstance(w, float) for w in weights) and sum(weights) <= 0:
        raise ParamError(f"{method.name}: weights must have a positive sum, got {weights}", "weights")
    return out


@dataclass(frozen=True)
class GramHandle:
    """One expert's per-token mean gram of one module: a typed handle the engine's gram methods
    load on call (a new tensor each time, checked finite) in `dtype` on `device`.

    Summed grams are divided by their own token count and imported mean grams used as they are, so
    experts weigh the same whichever way their grams were stored. `key` names the stored tensor:
    modules that see the same input (q/k/v, gate/up) share it, so work done for one of them (a
    factorisation) serves the others; `MergeMethod.group` tells the engine to merge them together.
    """

    grams: "GramDir"
    module: str
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    augmented: bool = False  # the input augmented by a constant 1: a bias solved with the weight (grams/solve.py)

    @property
    def key(self) -> tuple:
        ref = self.grams.modules[self.module]
        return (str(self.grams.path), ref.file, ref.key) + (("augmented",) if self.augmented else ())

    def __call__(self) -> torch.Tensor:
        load = self.grams.load_mean_augmented if self.augmented else self.grams.load_mean
        gram = load(self.module, self.dtype, self.device)  # sums divided by their token count
        return check_finite(gram, f"{self.grams.path / self.grams.modules[self.module].file} (gram of {self.module})")


class MergeMethod(ABC):
    """Merge the experts' versions of one tensor (or one block of its rows) into one.

    Subclasses set `name` (the registry key, as in `--method NAME`), declare `params` and
    implement `merge`; `paper` links the method's paper (`mergeflow methods --describe NAME`).
    Built with `get_method(name)(values)`: `values` holds the params the user gave, the others
    take their declared default.
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    uses_grams: ClassVar[bool] = False
    uses_base: ClassVar[bool] = False
    row_separable: ClassVar[bool] = True

    def __init__(self, values: Optional[Mapping[str, Any]] = None):
        self.values = check_values(type(self), values or {})
        self.num_layers = 0
        self.device = "cpu"

    @classmethod
    def param(cls, name: str) -> Param:
        for p in cls.params:
            if p.name == name:
                return p
        raise KeyError(f"method {cls.name!r} declares no parameter {name!r}")

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> "MergeMethod":
        """Built from a params file's knobs (`alpha` and the `merge` group: every method's), taking
        the ones this method declares."""
        declared = {p.name for p in cls.params}
        return cls({name: value for name, value in values.items() if name in declared})

    def prepare(self, tensor_names: Sequence[str], *, num_experts: Optional[int] = None, device: str = "cpu") -> None:
        """Called by the engine once before the first tensor: learns the layer count (gradients),
        checks per-expert lists against `num_experts`, and the device the method may compute on
        (`auto`: CUDA when visible)."""
        layers = [i for i in map(layer_index, tensor_names) if i is not None]
        self.num_layers = max(layers) + 1 if layers else 0
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        if num_experts is None:
            return
        for p in self.params:
            given = self.values.get(p.name)
            if p.per_expert and given is not None and len(given) != num_experts:
                raise ParamError(f"{self.name}: {p.name} has {len(given)} values for {num_experts} experts; give one per expert, in their order", p.name)

    def value(self, name: str, tensor: str) -> Any:
        """The value of param `name` for `tensor`: a gradient interpolated at the tensor's layer,
        the first matching pattern of a mapping, or the scalar; per-expert params give a list."""
        p = self.param(name)
        given = self.values.get(name, p.default)
        if given is None:
            return None
        if p.per_expert:
            return [p.resolve(v, tensor, self.num_layers) for v in given]
        return p.resolve(given, tensor, self.num_layers)

    def expert_weights(self, tensor: str, n: int, *, normalise: bool) -> list[float]:
        """The experts' weights for `tensor` (`weights`, or 1 each), summing to 1 with `normalise`."""
        declared = any(p.name == "weights" for p in self.params)
        weights = (self.value("weights", tensor) if declared else None) or [1.0] * n
        if len(weights) != n:
            raise ParamError(f"{self.name}: weights has {len(weights)} values for {n} experts; give one per expert, in their order", "weights")
        total = sum(weights)
        if total <= 0:
            raise ParamError(f"{self.name}: weights must have a positive sum, got {weights} for {tensor}", "weights")
        return [w / total for w in weights] if normalise else list(weights)

    def use_grams(self, grams: Sequence["GramDir"], model: "CheckpointReader", *, lm_head: bool = False) -> None:
        """Gram methods: called once after `prepare` with the experts' validated gram directories
        (one per expert) and the first expert; decide which tensors get grams (`gram_handles`).
        `lm_head`: the engine's `regmean_lm_head` option, solve the output layer too."""

    def gram_handles(self, tensor: str) -> Optional[list[GramHandle]]:
        """The gram handles (one per expert) `merge` receives for `tensor`, or None."""
        return None

    def block_copies(self, inputs: int) -> Optional[int]:
        """Streaming methods: float32 copies of one block of rows held at the peak of `merge` (and of
        `statistics`' passes), the `inputs` tensors (experts and base) included; None: not streaming."""
        return None

    def statistics(self, name: str, shape: tuple[int, ...]) -> Optional[Any]:
        """Streaming methods: the tensor-wide numbers `merge` needs for tensor `name`, as a
        `streaming.Statistics` the engine fills in passes over the row blocks; None: none needed."""
        return None

    def group(self, tensor: str) -> str:
        """Tensors with one group share work (RegMean: one factorisation for q/k/v): the engine
        merges them one after another, in the order of (group, name)."""
        return tensor

    @abstractmethod
    def merge(
        self,
        name: str,
        tensors: Sequence[torch.Tensor],
        *,
        grams: Optional[Sequence[GramLoader]] = None,
        base: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Return the merged tensor (any float dtype; the engine casts it to the experts' dtype).

        `grams`, for methods with `uses_grams` and tensors with `gram_handles`, are zero-argument
        callables (`GramHandle`s in the engine), one per expert, each returning that expert's
        `[in, in]` per-token mean gram, as a new tensor on every call (methods may modify it in
        place); otherwise None. `base` is the base model's tensor (same rows) for `uses_base`.
        Streaming methods whose `statistics` gave one also receive `stats=` (module docstring).
        """

    def config(self) -> dict:
        """What defines this merge, saved beside the merged model: the method and every declared
        param, as given or defaulted (per-layer lists and mappings as written)."""
        return {"method": self.name, **{p.name: self.values.get(p.name, p.default) for p in self.params}}

    def report(self) -> dict:
        """What happened in this merge (RegMean: modules solved, least-squares fallbacks), saved
        after the inputs in mergeflow_merge.json."""
        return {}


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`sum_i w_i t_i` in float32, as a new tensor."""
    out = tensors[0].to(torch.float32).mul(weights[0])
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t.to(torch.float32), alpha=w)
    return out
