"""`mergeflow merge`'s method options and `mergeflow methods`, generated from the params the merge
methods declare (`methods.base.Param`), so that the CLI, params.yaml and the docs never disagree.

The methods are imported on first use (when click builds the options), never when `mergeflow.cli`
is imported: `cli.run` pins the CPU kernels before torch loads (README "Reproducibility").
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Mapping

import click
import yaml
from click.core import ParameterSource


def _as_type(value: Any, kind: type) -> Any:
    """YAML 1.1 reads `1e-3` as a string: a float param takes it as the number it means."""
    if isinstance(value, list):
        return [_as_type(v, kind) for v in value]
    if isinstance(value, dict):
        return {k: _as_type(v, kind) for k, v in value.items()}
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_value(text: str, kind: type = str) -> Any:
    """A param value from the command line, as YAML: `0.3`, `[0.1, 0.5]`, `{self_attn: 0.3, mlp: 0.7}`, `float64`."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(f"{text!r} is not a value, list or mapping (YAML)") from None
    return _as_type(text if value is None else value, kind)


class ParamValue(click.ParamType):
    """A declared param's value on the command line (YAML; checked by the method, not by click)."""

    name = "value"

    def __init__(self, kind: type):
        self.kind = kind

    def convert(self, value, param, ctx):
        try:
            return parse_value(value, self.kind) if isinstance(value, str) else value
        except ValueError as err:
            self.fail(str(err), param, ctx)


class MethodOption(click.Option):
    """An option generated from a declared param: name, default and help from the declaration.
    `declared` holds (method name, Param) for every registered method that declares it."""

    def __init__(self, declared: list[tuple[str, Any]]):
        param = declared[0][1]
        defaults = {repr(p.default) for _, p in declared}
        default = param.default if len(defaults) == 1 else None
        flag = f"--{param.name.replace('_', '-')}"
        decls = [f"--{param.name[:-1].replace('_', '-')}", flag] if param.per_expert and param.name.endswith("s") else [flag]
        where = ", ".join(m for m, _ in declared)
        extra = f"; range {param.range_text()}" if param.range_text() and not param.choices else ""
        per = (" Repeat it, one per expert, in --model order." if param.per_expert else "") + (
            " Per layer: a list [a, b, ...] (interpolated over the layers) or a mapping {self_attn: a, mlp: b}." if param.per_layer else "")
        if len(defaults) > 1:
            per += " Default: " + ", ".join(f"{m} {p.default}" for m, p in declared) + "."
        super().__init__(
            [*decls, param.name], type=click.Choice(param.choices) if param.choices and not param.per_layer else ParamValue(param.type), multiple=param.per_expert,
            default=tuple(default or ()) if param.per_expert else default, show_default=default is not None,
            help=f"{where}: {param.help}{extra}.{per}",
        )
        self.param = param


def method_options() -> list[MethodOption]:
    """One option per param name the registered methods declare, in the order they are first declared."""
    from .methods import declared_params

    return [MethodOption([(cls.name, p) for cls, p in pairs]) for pairs in declared_params().values()]


class MergeCommand(click.Command):
    """A command whose method options are generated from the declarations on first use."""

    def get_params(self, ctx):
        if not any(isinstance(p, MethodOption) for p in self.params):
            self.params.extend(method_options())
        return super().get_params(ctx)


def parse_pairs(pairs: Iterable[str]) -> dict[str, Any]:
    """`--param NAME=VALUE` pairs -> {name: value} (values as YAML)."""
    out = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--param {pair!r}: expected NAME=VALUE")
        try:
            out[name.strip().replace("-", "_")] = parse_value(text)
        except ValueError as err:
            raise ValueError(f"--param {pair!r}: {err}") from None
    return out


def given_values(ctx: click.Context, values: Mapping[str, Any], pairs: Iterable[str]) -> dict[str, Any]:
    """The method params the user gave: generated options not left at their default, and `--param`s."""
    given = {name: list(v) if isinstance(v, tuple) else v for name, v in values.items() if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
    given.update(parse_pairs(pairs))
    return given


def build_method(name: str, given: Mapping[str, Any]):
    """`get_method(name)(given)`; a bad value is one line naming the option to fix."""
    from .methods import ParamError, declared_params, get_method

    cls = get_method(name)
    try:
        return cls(given)
    except ParamError as err:
        option = f"--{err.param.replace('_', '-')}" if err.param in declared_params() else f"--param {err.param}=..."
        raise ValueError(f"{err} ({option})") from None


def describe(name: str) -> str:
    """`mergeflow methods --describe NAME`: the method's summary, paper, needs and every param."""
    from .methods import get_method

    cls = get_method(name)
    doc = (sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip()
    needs = [what for what, flag in (("the base model (--base)", cls.uses_base), ("grams (--gram)", cls.uses_grams)) if flag]
    lines = [f"{cls.name}: {doc.splitlines()[0] if doc else ''}", f"paper: {cls.paper or '-'}", f"needs: {', '.join(needs) or 'the experts only'}"]
    lines.append("params:" if cls.params else "params: none")
    for p in cls.params:
        info = p.describe()
        lines.append(f"  {p.name}: {info['type']}, default {p.default!r}" + (f", {info['range']}" if info["range"] else ""))
        lines.append(f"      {p.help}")
    return "\n".join(lines)


def listing() -> list[str]:
    """`mergeflow methods`: one line per registered method."""
    from .methods import available, get_method

    lines = []
    for name in available():
        cls = get_method(name)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        params = ", ".join(p.name for p in cls.params) or "-"
        lines.append(f"{name:16s} {doc}  [params: {params}]")
    return lines
