"""Defaults live in one place, the params models: the `mergeflow` options that mirror a params key
take their default from there, the shipped params.yaml says the same, and every DVC stage lists
in its script exactly the params its dvc.yaml entry lists (and refuses a file without them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click
import pytest
import yaml
from pydantic import BaseModel

from mergeflow.cli import ParamsOption, main
from mergeflow.cli_methods import method_options
from mergeflow.params import PIPELINE_PARAMS, Params, field_default, load_params, missing_keys

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((ROOT / "params.yaml").read_text())
# Options named like a params key that are not that key's mirror, and why.
NOT_MIRRORS = {
    ("merge", "method"): "required: a merge names its method",
    ("merge", "base"): "a path (models.local.base names a directory to copy, not a default)",
    ("evaluate", "tasks"): "required: an evaluation names its tasks",
    ("evaluate", "data_files"): "TASK=FILE pairs; empty by default, as eval.data_files",
    ("submit", "test_csv"): "required: the file to answer",
}


def commands(group: click.Group, prefix: str = ""):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def leaf_keys(model: type[BaseModel] = Params) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names |= leaf_keys(field.annotation)
        else:
            names.add(name)
    return names


def shipped(key: str):
    value = SHIPPED
    for part in key.split("."):
        value = value[part]
    return value


MIRRORS = [(name, option) for name, command in commands(main) for option in command.params if isinstance(option, ParamsOption)]
# `mergeflow merge`'s method options, generated from the params the registered methods declare
METHOD_OPTIONS = method_options()


def test_every_option_named_like_a_params_key_mirrors_one():
    leaves = leaf_keys()
    unmirrored = [(name, option.name) for name, command in commands(main) for option in command.params
                  if isinstance(option, click.Option) and option.name in leaves and not isinstance(option, ParamsOption) and (name, option.name) not in NOT_MIRRORS]
    assert unmirrored == []
    assert len(MIRRORS) >= 29  # grams compute 12, merge 3 engine options, evaluate 3 + 9 backend, submit 3 + 9, report 1
    assert sorted(o.name for o in METHOD_OPTIONS) == ["alpha", "density", "scaling", "solver_dtype", "weights"]


def params_key(name: str) -> str:
    """Where a method param sits in params.yaml: `alpha` on top, the others in `merge`."""
    return name if name == "alpha" else f"merge.{name}"


@pytest.mark.parametrize("option", METHOD_OPTIONS, ids=lambda o: o.name)
def test_method_option_defaults_are_the_declared_and_the_shipped_ones(option):
    """One declaration: the generated option's default, every declaring method's default and the
    value params.yaml ships are the same (the CLI passes only what the user gives, so a method
    never sees the option's default instead of its own)."""
    from mergeflow.methods import declared_params

    declared = {repr(p.default) for _, p in declared_params()[option.name]}
    assert len(declared) == 1, f"{option.name}: methods declare different defaults {declared}"
    assert as_cli(option.default, option.multiple) == as_cli(option.param.default, option.multiple)
    assert as_cli(shipped(params_key(option.name)), option.multiple) == as_cli(option.param.default, option.multiple), f"params.yaml {params_key(option.name)}"


def as_cli(value, multiple: bool):
    """A repeatable option holds a tuple; a null list (merge.weights) is no values."""
    return tuple(value or ()) if multiple else value


@pytest.mark.parametrize(("command", "option"), MIRRORS, ids=[f"{c}--{o.name}" for c, o in MIRRORS])
def test_cli_default_is_the_params_default_and_the_shipped_value(command, option):
    default, _ = field_default(option.params_key)
    assert as_cli(option.default, option.multiple) == as_cli(default, option.multiple)
    assert as_cli(shipped(option.params_key), option.multiple) == as_cli(default, option.multiple), f"params.yaml {option.params_key}"


def test_the_two_defaults_that_disagreed():
    by_key = {option.params_key: option.default for _, option in MIRRORS} | {o.name: o.default for o in METHOD_OPTIONS}
    assert by_key["alpha"] == 0.1 and by_key["submit.max_new_tokens"] == 16


def stage_params() -> dict[str, list[str]]:
    """stage script -> its PARAMS."""
    out = {}
    for path in sorted((ROOT / "stages").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"stage_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out[f"stages/{path.name}"] = module.PARAMS
    return out


def test_each_stage_requires_what_dvc_yaml_lists():
    scripts = stage_params()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        script, listed = stage["cmd"].split()[1], stage.get("params", [])
        if script == "stages/download.py":  # generated by `mergeflow use`: finer keys, each inside one of the script's groups
            assert listed and all(any(k == g or k.startswith(f"{g}.") for g in scripts[script]) for k in listed), f"dvc.yaml stage {name} vs {script} PARAMS"
        else:
            assert sorted(listed) == sorted(scripts[script]), f"dvc.yaml stage {name} vs {script} PARAMS"


@pytest.mark.parametrize("path", [ROOT / "params.yaml", *sorted((ROOT / "recipes").glob("*.yaml"))], ids=lambda p: p.name)
def test_shipped_params_and_recipes_have_every_key_the_stages_read(path):
    assert sorted({key for keys in stage_params().values() for key in keys}) == list(PIPELINE_PARAMS)
    load_params(path, require=PIPELINE_PARAMS)


def test_models_needs_only_the_selected_source():
    raw = {"models": {"source": "local", "local": {"base": "b", "experts": {}}}}
    assert missing_keys(raw, ["models"]) == []
    assert missing_keys({"models": {"local": {"base": "b"}}}, ["models"]) == ["models.source", "models.toy"]
    assert missing_keys({"eval": {"hf": {"dtype": "auto"}}}, ["eval.hf", "eval.backend"]) == ["eval.hf.batch_size", "eval.hf.device", "eval.backend"]


def test_each_hub_expert_names_its_revision():
    """A hub expert without `revision` would silently follow `main` (and `mergeflow use` could not pin it)."""
    hub = {"base": {"repo_id": "b", "revision": "v1"}, "experts": {"math": {"repo_id": "m"}, "code": {"repo_id": "c", "revision": "v2"}}}
    assert missing_keys({"models": {"source": "hub", "hub": hub}}, ["models"]) == ["models.hub.experts.math.revision"]


def test_a_method_built_with_no_values_takes_the_shipped_params():
    """`get_method(name)()` merges as the shipped params.yaml does: the stage passes params.yaml's
    values, the library the declared defaults, and they agree."""
    from mergeflow.methods import available, get_method

    for name in available():
        cls = get_method(name)
        assert cls().config() == {"method": name, **{p.name: shipped(params_key(p.name)) for p in cls.params}}
    assert get_method("regmean")().config() == {"method": "regmean", "alpha": 0.1, "weights": None, "solver_dtype": "float32"}
    assert field_default("alpha")[0] == get_method("regmean").param("alpha").default  # Params' top-level alpha: the declaration's


def test_library_entry_points_default_to_the_params_defaults():
    """compute_grams spells out the params' defaults in its signature: this keeps them in step."""
    import inspect

    from mergeflow.grams.collect import compute_grams
    from mergeflow.params import GramParams, SubmitParams
    from mergeflow.submission import write_submission

    for fn, group, model in [(compute_grams, "gram", GramParams), (write_submission, "submit", SubmitParams)]:
        signature = inspect.signature(fn).parameters
        for name in model.model_fields:
            default = field_default(f"{group}.{name}")[0]
            assert as_cli(signature[name].default, isinstance(default, list)) == as_cli(default, isinstance(default, list)), f"{fn.__name__}({name}=...)"
