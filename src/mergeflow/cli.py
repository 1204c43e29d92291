"""The `mergeflow` command line: one sub-command per pipeline step, usable without DVC.

    mergeflow grams    --model DIR --data FILE.jsonl --out DIR     (= mergeflow grams compute ...)
    mergeflow grams sum PART... --out DIR | grams import gram.pkl --model DIR --out DIR | grams verify DIR
    mergeflow merge    --method regmean --alpha 0.1 --model A --model B --gram GA --gram GB --out DIR
    mergeflow merge    --method ties --base BASE --model A --model B --density 0.2 --out DIR
    mergeflow fisher   --model DIR --data FILE.jsonl --out DIR     (then merge --method fisher --fisher F ...)
    mergeflow merge    --method regmean_pp --model A --model B --calib A.jsonl --calib B.jsonl --out DIR
    mergeflow evaluate --model DIR --task toy_math --out metrics.json
    mergeflow submit   --model DIR --test data/test.csv --out submission.csv
    mergeflow report   [--rev COMMIT | --all-commits | --exp-show exp.json] [--out-dir plots]
    mergeflow methods  [--describe regmean]
    mergeflow use      recipes/smollm2-cpu.yaml
    mergeflow plan     [--params params.yaml] [--tflops 150]
    mergeflow tune     [--max-trials N] [--timeout SECONDS] [--apply]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from .determinism import pin_cpu_kernels
from .evaluation.tasks import shipped_tasks
from .logs import setup_logging
from .cli_methods import MergeCommand
from .params import field_default

PATH = click.Path(path_type=Path)
EXISTING_DIR = click.Path(path_type=Path, exists=True, file_okay=False)


class ParamsOption(click.Option):
    """An option that mirrors a params.yaml key: its default (and its help, unless given) come
    from the params models, the one place defaults live, so the CLI and the pipeline agree."""

    def __init__(self, *args, params_key: str, **kwargs):
        default, description = field_default(params_key)
        kwargs.setdefault("help", description)
        kwargs.setdefault("show_default", default is not None and not kwargs.get("is_flag"))
        super().__init__(*args, default=default, **kwargs)
        self.params_key = params_key


def param_option(*decls: str, key: str, **kwargs):
    """`click.option` with the default of the params key `key` (dotted, e.g. `gram.max_length`)."""
    return click.option(*decls, cls=ParamsOption, params_key=key, **kwargs)


def calibration_options(command):
    """The options that choose and tokenise the calibration rows (params `gram.*`), shared by
    `grams` and `fisher` so that both read the same rows the same way."""
    for option in reversed([
        param_option("--text-field", key="gram.text_field", help="Field with the text, or with chat messages [{role, content}] rendered by the model's chat template."),
        param_option("--max-length", key="gram.max_length", type=click.IntRange(min=1), help="Truncate each text to this many tokens."),
        param_option("--num-samples", key="gram.num_samples", type=click.IntRange(min=1), help="Use only N rows [default: all]: the first N, or N drawn with --seed."),
        param_option("--seed", key="gram.seed", type=int, help="Shuffle the rows with this seed before taking --num-samples [default: file order]."),
    ]):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging (per-module solver residuals, ...).")
@click.version_option(package_name="mergeflow")
def main(verbose: bool) -> None:
    """Merge fine-tuned LLM experts (`mergeflow methods` lists the methods), evaluate the models
    with lm-eval and write a Kaggle submission.

    In the DVC pipeline these run as stages (`dvc repro`); each is also a command of its own.
    """
    setup_logging(verbose)


class DefaultCommandGroup(click.Group):
    """A group whose first command runs when no sub-command is named (`mergeflow grams --model ...`)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = [next(iter(self.commands)), *args]
        return super().parse_args(ctx, args)


GRAM_FORCE = click.option("--force", is_flag=True, help="Replace --out if it holds grams mergeflow wrote and nothing else (never an input, a file or foreign files).")


@main.group(cls=DefaultCommandGroup)
def grams() -> None:
    """Compute, add, import and verify RegMean grams (`mergeflow grams compute` is the default)."""


def list_modules(ctx: click.Context, param: click.Parameter, model: Optional[Path]) -> None:
    """`--list-modules MODEL`: print what RegMean would solve and what would be averaged, then exit."""
    if model is None or ctx.resilient_parsing:
        return
    from .grams.modules import discover_dir, listing

    modules, names = discover_dir(model)
    click.echo(listing(modules, names))
    click.echo("(with --lm-head the output layer is solved too, unless tied to the input embeddings)")
    ctx.exit()


@grams.command("compute")
@click.option("--list-modules", type=EXISTING_DIR, is_eager=True, expose_value=False, callback=list_modules, metavar="MODEL",
              help="Print which modules of MODEL RegMean solves (grams) and which tensors are averaged, then exit: check a model before a long run.")
@click.option("--model", required=True, type=EXISTING_DIR, help="Expert: a Hugging Face model directory.")
@click.option("--data", required=True, type=PATH, help="Calibration data: JSONL, JSON, Parquet or CSV with a text (or chat messages) field.")
@click.option("--out", required=True, type=PATH, help="Gram directory to write (grams.json + one safetensors file per layer).")
@calibration_options
@param_option("--target-field", key="gram.target_field", help="Encoder-decoders (T5, BART): field with each row's target, on which the decoder is teacher-forced.")
@param_option("--batch-size", key="gram.batch_size", type=click.IntRange(min=1), help="Texts per forward pass (sorted by length to limit padding).")
@param_option("--device", key="gram.device", help="Forward passes on cpu, cuda or auto. Under torchrun with cuda each rank takes GPU LOCAL_RANK of CUDA_VISIBLE_DEVICES.")
@param_option("--model-dtype", key="gram.model_dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="dtype of the forward pass (bf16 is fine on a GPU: grams are accumulated in --gram-dtype).")
@param_option("--gram-dtype", key="gram.dtype", type=click.Choice(["float32", "float64"]), help="dtype the grams are accumulated and stored in.")
@param_option("--lm-head", key="gram.include_lm_head", is_flag=True, help="Also the output layer's input (for RegMean on lm_head).")
@param_option("--accumulate-on", key="gram.accumulate_on", type=click.Choice(["device", "cpu"]),
              help="Where the sums live. `device` is fastest; `cpu` frees GPU memory for the model at the cost of copying every batch's activations to the host.")
@param_option("--max-gram-memory", key="gram.max_gram_memory", help="Cap the sums' memory (e.g. 8GB): the layers are split into groups, one pass over the data per group "
              "(passes stop after their last layer, so k groups cost about (k+1)/2 forwards instead of 1). [default: no cap, one pass]")
@param_option("--checkpoint-every", key="gram.checkpoint_every", type=click.IntRange(min=0), help="Save the partial sums every N batches (0: never); "
              "rerunning the same command after a kill continues from the last save.")
@click.option("--shard", default=None, help="Compute only slice i/n of the rows (e.g. 0/4), for machines that each take one; add them with `mergeflow grams sum`.")
@GRAM_FORCE
def grams_compute(model, data, out, text_field, target_field, max_length, batch_size, num_samples, seed, device, model_dtype, gram_dtype, lm_head, accumulate_on, max_gram_memory, checkpoint_every, shard, force) -> None:
    """Compute RegMean grams: the sum of x x^T of every block Linear's input over non-padding tokens.

    q/k/v (and gate/up), which see the same input, share one tensor. Under `torchrun
    --nproc_per_node K -m mergeflow grams ...` the rows are split across ranks (gloo on CPU, NCCL
    on GPU) and the sums all-reduced; the result equals a single process's.
    """
    from .grams.collect import compute_grams
    from .params import GramParams

    config = GramParams(
        text_field=text_field, target_field=target_field, max_length=max_length, batch_size=batch_size, num_samples=num_samples, seed=seed, device=device,
        model_dtype=model_dtype, dtype=gram_dtype, include_lm_head=lm_head, accumulate_on=accumulate_on, max_gram_memory=max_gram_memory, checkpoint_every=checkpoint_every,
    )
    compute_grams(model, data, out, config, shard=shard, overwrite=force)


@grams.command("sum")
@click.argument("parts", nargs=-1, required=True, type=EXISTING_DIR)
@click.option("--out", required=True, type=PATH, help="Gram directory to write.")
@GRAM_FORCE
def grams_sum(parts, out, force) -> None:
    """Add gram directories computed on slices of the data (`--shard i/n`): grams and token counts add."""
    from .grams.combine import sum_grams

    sum_grams(parts, out, overwrite=force)


@grams.command("import")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--model", required=True, type=EXISTING_DIR, help="The model the grams belong to: module names and shapes are checked against it.")
@click.option("--out", required=True, type=PATH, help="Gram directory to write (reduction: mean).")
@GRAM_FORCE
def grams_import(file, model, out, force) -> None:
    """Convert a published gram pickle (module -> [in, in] mean gram, as the RegMean reference's
    gram.pkl) without running pickle code. Peak memory: about twice the largest gram."""
    from .grams.importer import import_grams

    import_grams(file, model, out, overwrite=force)


@grams.command("verify")
@click.argument("dirs", nargs=-1, required=True, type=EXISTING_DIR)
def grams_verify(dirs) -> None:
    """Check gram directories against the sizes and SHA-256 recorded in their grams.json."""
    from .grams import GramDir

    for d in dirs:
        files = GramDir.open(d).verify()
        click.echo(f"{d}: ok ({len(files)} files)")


@main.command(cls=MergeCommand)
@click.argument("out_dir", required=False, type=PATH, metavar="[OUT]")
@click.option("--config", type=click.Path(path_type=Path, exists=True, dir_okay=False), help="A mergekit merge config (YAML) instead of --method, --model, --base and the method's options; OUT (or --out) is the output.")
@click.option("--method", help="Merge method: a name from `mergeflow methods`, or path/to/file.py:ClassName.")
@click.option("--model", "models", multiple=True, type=EXISTING_DIR, help="An expert directory; repeat for each expert.")
@click.option("--out", type=PATH, help="Output model directory (written atomically).")
@click.option("--gram", "grams_", multiple=True, type=EXISTING_DIR, help="Gram directory of each expert, in --model order (regmean).")
@click.option("--fisher", "fishers", multiple=True, type=EXISTING_DIR, help="Fisher directory of each expert, in --model order (fisher; `mergeflow fisher`).")
@click.option("--calib", "calibs", multiple=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Calibration file of each expert, in --model order (regmean_pp; rows chosen as `mergeflow grams` does, with its defaults).")
@click.option("--base", type=EXISTING_DIR, help="The experts' base model (task_arithmetic, ties).")
@click.option("--param", "param_pairs", multiple=True, metavar="NAME=VALUE", help="A param of the method that has no option of its own (a plugin's); the value is YAML: 0.3, [0.1, 0.5], {mlp: 0.7}. Repeatable.")
@param_option("--lm-head", key="merge.regmean_lm_head", is_flag=True, help="regmean: solve lm_head too (needs its grams; skipped when tied to the embeddings).")
@param_option("--device", key="merge.device", help="Where the method computes (RegMean's solves): cpu, cuda or auto (cuda when visible; CUDA_VISIBLE_DEVICES picks the GPU).")
@param_option("--max-shard-size", key="merge.max_shard_size", help="Largest output shard, e.g. 500MB, 5GB.")
@click.option("--force", is_flag=True, help="Replace --out if it holds a merged model mergeflow wrote and nothing else (never an input, a file or foreign files).")
@click.option("--no-verify", is_flag=True, help="Skip checking the grams' SHA-256 against grams.json (about 3 s per GB).")
@click.option("--no-magnitude-check", is_flag=True, help="Accept merged weights with |value| > 1e4 (refused by default: a flipped exponent bit in an expert).")
@click.pass_context
def merge(ctx, out_dir, config, method, models, out, grams_, fishers, calibs, base, param_pairs, lm_head, device, max_shard_size, force, no_verify, no_magnitude_check,
          **method_values) -> None:
    """Merge experts tensor by tensor into one Hugging Face model directory.

    The method options below come from the params each method declares (`mergeflow methods
    --describe NAME`); a method takes only the ones given, the others keep its defaults.
    Memory stays bounded by a few tensors (huge ones in blocks of rows) plus one Linear's grams.
    `mergeflow merge --config mergekit.yml OUT` runs a mergekit config (README "mergekit configs").
    """
    from .model_files import parse_size
    from .cli_methods import build_method, given_values
    from .merge import Checks, merge_models

    given = given_values(ctx, method_values, param_pairs)
    out = check_merge_usage(out_dir, out, config, method, models, given)
    if config is not None:
        from .mergekit_config import merge_from_config

        merge_from_config(config, out, device=device, max_shard_size=parse_size(max_shard_size), overwrite=force, checks=Checks(magnitudes=not no_magnitude_check))
        return
    merger = build_method(method, given)
    if getattr(merger, "needs_calibration", False):  # regmean_pp: layer by layer, through the calibration data
        from .regmean_pp import Calibration, merge_regmean_pp

        merge_regmean_pp(models, merger, out, calibration=Calibration(tuple(calibs)), device=device, max_shard_size=parse_size(max_shard_size),
                         overwrite=force, check_magnitudes=not no_magnitude_check)
        return
    merge_models(models, merger, out, grams=grams_, fisher=fishers, base=base, lm_head=lm_head, device=device, max_shard_size=parse_size(max_shard_size),
                 overwrite=force, checks=Checks(verify_inputs=not no_verify, magnitudes=not no_magnitude_check))


def check_merge_usage(out_dir, out, config, method, models, given):
    """The output directory; --config stands for --method, --model and the method's options."""
    if out_dir is not None and out is not None:
        raise click.UsageError("give the output once: OUT or --out")
    out = out_dir or out
    if out is None:
        raise click.UsageError("missing the output directory (OUT or --out)")
    if config is not None and (method or models):
        raise click.UsageError("--config names the method and models itself: drop --method and --model")
    if config is not None and given:
        raise click.UsageError(f"--config sets the method's params itself: drop --{', --'.join(n.replace('_', '-') for n in given)} (or edit the config)")
    if config is None and not (method and models):
        raise click.UsageError("give --method and --model (once per expert), or a mergekit --config")
    return out


BACKEND_OPTIONS = [
    param_option("--backend", key="eval.backend", type=click.Choice(["auto", "vllm", "hf"]), help="lm-eval model: vllm (CUDA, pip install 'mergeflow[vllm]'), hf, or auto (vllm when installed and CUDA is visible)."),
    param_option("--dtype", key="eval.hf.dtype", help="Model dtype (auto: the checkpoint's)."),
    param_option("--batch-size", key="eval.hf.batch_size", type=click.IntRange(min=1), help="hf: requests per batch."),
    param_option("--device", key="eval.hf.device", help="hf: cpu, cuda, cuda:N or auto."),
    param_option("--tensor-parallel-size", key="eval.vllm.tensor_parallel_size", type=click.IntRange(min=1), help="vllm: GPUs per model."),
    param_option("--gpu-memory-utilization", key="eval.vllm.gpu_memory_utilization", type=click.FloatRange(0, 1, min_open=True), help="vllm: fraction of GPU memory to use."),
    param_option("--max-model-len", key="eval.vllm.max_model_len", type=click.IntRange(min=1), help="vllm: context length [default: the model's]."),
    param_option("--tokenizer", key="eval.vllm.tokenizer", help="vllm: tokenizer directory or repo [default: the model's]."),
    param_option("--trust-remote-code", key="eval.trust_remote_code", is_flag=True, help="Allow the model repo's own Python code (off by default)."),
]


def backend_options(fn):
    for option in reversed(BACKEND_OPTIONS):
        fn = option(fn)
    return fn


def eval_params(options: dict, **extra):
    """The `eval` params that the backend options (`backend_options`) and `extra` fields give."""
    from .params import EvalParams

    o = options
    return EvalParams(
        backend=o["backend"],
        hf={"dtype": o["dtype"], "batch_size": o["batch_size"], "device": o["device"]},
        vllm={k: o[k] for k in ("dtype", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "tokenizer")},
        trust_remote_code=o["trust_remote_code"],
        **extra,
    )


def parse_data_files(values: tuple[str, ...]) -> dict[str, str]:
    files = {}
    for value in values:
        task, sep, path = value.partition("=")
        if not sep or not task or not path:
            raise click.BadParameter(f"{value!r}: expected TASK=FILE", param_hint="--data-file")
        files[task] = path
    return files


@main.command()
@click.option("--model", required=True, type=EXISTING_DIR, help="Model directory to evaluate.")
@click.option("--task", "tasks", required=True, multiple=True, help=f"lm-eval task; repeat for several (shipped: {', '.join(shipped_tasks())}; or any lm-eval task).")
@click.option("--out", required=True, type=PATH, help="Metrics JSON to write ({task: {metric: value}}).")
@click.option("--data-root", default=".", show_default=True, type=PATH, help="Folder that data files are relative to.")
@click.option("--data-file", "data_files", multiple=True, metavar="TASK=FILE", help="Local data of a task (csv, json(l), parquet); repeatable.")
@param_option("--limit", key="eval.limit", type=click.IntRange(min=1), help="Evaluate only the first N documents per task.")
@param_option("--max-gen-toks", key="eval.max_gen_toks", type=click.IntRange(min=1), help="Cap on generated tokens [default: each task's own].")
@click.option("--logs", default=None, type=PATH, help="Folder for lm-eval's per-sample records (<task>.jsonl).")
@param_option("--allow-code-execution", key="eval.allow_code_execution", is_flag=True, help="Let humaneval*/mbpp execute the generated code (sets HF_ALLOW_CODE_EVAL=1).")
@backend_options
def evaluate(model: Path, tasks: tuple[str, ...], out: Path, data_root: Path, data_files: tuple[str, ...], limit: int | None, max_gen_toks: int | None, logs: Path | None, allow_code_execution: bool, **backend) -> None:
    """Evaluate a model with lm-eval (vLLM or HF backend) and write flattened metrics."""
    from .evaluation.code_eval import CodeExecutionRefused
    from .evaluation.harness import evaluate_model

    params = eval_params(backend, data_files=parse_data_files(data_files), allow_code_execution=allow_code_execution, max_gen_toks=max_gen_toks)
    try:
        evaluate_model(model, tasks, out, params=params, data_root=data_root, limit=limit, log_dir=logs)
    except CodeExecutionRefused as err:
        raise ValueError(f"{err}: pass --allow-code-execution to run them") from None


@main.command()
@click.option("--model", required=True, type=EXISTING_DIR, help="The merged model directory.")
@click.option("--test", "test_csv", required=True, type=PATH, help="The competition's test.csv (id,input,eval_type,answer_choices).")
@click.option("--out", required=True, type=PATH, help="submission.csv to write (id,prediction,dummy_field).")
@param_option("--max-new-tokens", key="submit.max_new_tokens", type=click.IntRange(min=1), help="Most tokens generated for a generation row.")
@param_option("--stop", key="submit.stop", multiple=True, help="Stop sequence for generation rows; repeatable.")
@param_option("--choice-delimiter", key="submit.choice_delimiter", help="Between the input and each choice when scoring multiple choice.")
@backend_options
def submit(model: Path, test_csv: Path, out: Path, max_new_tokens: int, stop: tuple[str, ...], choice_delimiter: str, **backend) -> None:
    """Answer every row of test.csv and write the Kaggle submission.csv."""
    from .params import SubmitParams
    from .submission import write_submission

    submit = SubmitParams(max_new_tokens=max_new_tokens, stop=list(stop), choice_delimiter=choice_delimiter)
    write_submission(model, test_csv, out, params=eval_params(backend), submit=submit)


@main.command()
@click.option("--exp-show", "exp_show_file", default=None, type=PATH, help="A saved `dvc exp show --json` [default: run it in --repo].")
@click.option("--repo", default=".", show_default=True, type=EXISTING_DIR, help="The DVC repository whose experiments to read.")
@click.option("--rev", "revs", multiple=True, help="Experiments based on this commit (repeatable) [default: the current commit's], as `dvc exp show --rev`.")
@click.option("--all-commits", "-A", is_flag=True, help="Experiments based on every commit, as `dvc exp show --all-commits`.")
@click.option("--out-dir", default=Path("plots"), show_default=True, type=PATH, help="Writes alpha_sweep.csv and alpha_sweep.png here.")
@param_option("--method", key="method", help="The merge method whose alpha sweep to plot.")
@click.option("--reference", default=None, type=PATH, help="Published numbers to print ours beside (e.g. recipes/llama3-code-math.reference.csv).")
def report(exp_show_file: Path | None, repo: Path, revs: tuple[str, ...], all_commits: bool, out_dir: Path, method: str, reference: Path | None) -> None:
    """Tabulate and plot an alpha sweep (dvc exp run --queue -S alpha=...) against the experts.

    Reference lines: the base model and each expert of the same experiments (a warning when they
    disagree) and, if an experiment ran it, method=average.
    """
    from .report import exp_show, load_doc
    from .report import report as write_report

    if exp_show_file and (revs or all_commits):
        raise click.UsageError("--rev and --all-commits select what `dvc exp show` reads; a saved --exp-show file is already selected")
    doc = load_doc(exp_show_file) if exp_show_file else exp_show(repo, revs, all_commits)
    sweep = write_report(doc, out_dir, method)
    click.echo(f"selected {sweep.selection()}", err=True)
    for warning in sweep.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{'alpha':>6}  " + "  ".join(f"{m:>22}" for m in sweep.metrics))
    for alpha, _, values in sweep.points:
        click.echo(f"{alpha:>6g}  " + "  ".join(f"{values.get(m, float('nan')):>22.4f}" for m in sweep.metrics))
    click.echo(f"wrote {out_dir / 'alpha_sweep.csv'} and {out_dir / 'alpha_sweep.png'}")
    if reference:
        from .report import compare, read_reference

        click.echo(f"\n{'model':<22}{'metric':<44}{'reference':>10}{'ours':>10}")
        for model, metric, theirs, ours in compare(sweep, read_reference(reference)):
            click.echo(f"{model:<22}{metric:<44}{theirs:>10.4f}{'-' if ours is None else format(ours, '.4f'):>10}")


@main.command()
@click.option("--model", required=True, type=EXISTING_DIR, help="Expert: a Hugging Face model directory.")
@click.option("--data", required=True, type=PATH, help="Calibration data: JSONL, JSON, Parquet or CSV with a text (or chat messages) field.")
@click.option("--out", required=True, type=PATH, help="Fisher directory to write (fisher.json + one safetensors file per layer); an earlier one is replaced.")
@calibration_options
@param_option("--device", key="gram.device", help="Forward and backward passes on cpu, cuda or auto.")
@param_option("--model-dtype", key="gram.model_dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="dtype of the forward and backward pass.")
@param_option("--gram-dtype", "dtype", key="gram.dtype", type=click.Choice(["float32", "float64"]), help="dtype the Fisher is accumulated and stored in (as the grams').")
def fisher(model, data, out, text_field, max_length, num_samples, seed, device, model_dtype, dtype) -> None:
    """Compute an expert's diagonal Fisher (for `merge --method fisher`): the mean over calibration
    rows of each parameter's squared gradient of the row's log-likelihood, one row at a time."""
    from .fisher.compute import compute_fisher

    compute_fisher(model, data, out, text_field=text_field, max_length=max_length, num_samples=num_samples, seed=seed, device=device, model_dtype=model_dtype, dtype=dtype)


@main.command()
@click.option("--describe", "name", default=None, metavar="NAME", help="Show one method (a name, or path/to/file.py:ClassName): its paper and every param.")
def methods(name: str | None) -> None:
    """List the merge methods and the params each reads, or describe one."""
    from .cli_methods import describe, listing

    click.echo(describe(name) if name else "\n".join(listing()))


@main.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=PATH, help="The params file whose `tune:` group declares the search.")
@click.option("--max-trials", type=click.IntRange(min=0), default=None, help="Run at most N new trials now (the study keeps tune.trials as its target).")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Start no new trial after this many seconds (the running one finishes).")
@click.option("--apply", "apply_", is_flag=True, help="Write the promoted trial's params into --params, so that `dvc repro` reproduces it.")
@click.option("--plot", "plot_path", default=Path("plots/tune.png"), show_default=True, type=PATH, help="PNG of the objective and the params over trials.")
def tune(params_file: Path, max_trials: int | None, timeout: float | None, apply_: bool, plot_path: Path) -> None:
    """Search merge params (tune.space) for the best validation objective, one DVC experiment per trial.

    Trials run as `dvc exp run --temp -S ...` (visible in `dvc exp show`; downloads, grams and
    reference evaluations come from DVC's caches). Resumable: rerun the same command after a kill.
    When the study has tune.trials trials, its best is evaluated once on every eval task, the
    held-out ones included (experiment <study>-best-<trial>). Table: metrics/tune/<study>.csv.
    """
    from .tune.config import load_config
    from .tune.results import apply_values, plot, write_table
    from .tune.search import open_study, search

    root = Path(".")
    config = load_config(params_file)
    outcome = search(root, config, max_trials=max_trials, timeout=timeout)
    study = open_study(root, config, create=False)
    table = write_table(root, study)
    plot(study, plot_path)
    for name in outcome.recovered:
        click.echo(f"recovered {name} from its experiment (finished before the last run stopped)", err=True)
    click.echo(f"study {outcome.study}: {outcome.done}/{outcome.target} trials ({len(outcome.failed)} failed now); wrote {table} and {plot_path}")
    if outcome.best:
        click.echo(f"best: trial {outcome.best['trial']}, objective {outcome.best['objective']:.4g}: {outcome.best['values']}")
    if outcome.stopped:
        click.echo(f"stopped by {outcome.stopped}: rerun `mergeflow tune` to continue (or lower tune.trials to end the study here)")
    promoted = outcome.promoted
    if promoted:
        held = ", ".join(f"{t} {v:.4g}" for t, v in promoted["held_out"].items()) or "none declared"
        click.echo(f"promoted: trial {promoted['trial']} (experiment {promoted['experiment']}); held-out: {held}")
    if apply_:
        if not promoted:
            raise ValueError(f"study {outcome.study} has {outcome.done} of {outcome.target} trials and no promoted trial yet; "
                             "run `mergeflow tune` until it finishes (or lower tune.trials), then --apply")
        items = apply_values(params_file, promoted["values"])
        click.echo(f"{params_file}: {' '.join(items)}")
        click.echo(f"next: `dvc repro` (reproduces experiment {promoted['experiment']} from the run cache), then commit params.yaml and dvc.lock")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=PATH, help="The pipeline's params file to replace.")
@click.option("--dvc-yaml", default="dvc.yaml", show_default=True, type=PATH, help="Pipeline whose download stages, merge deps and evaluate data deps follow the params.")
def use(recipe: Path, params_file: Path, dvc_yaml: Path) -> None:
    """Switch the pipeline to RECIPE (e.g. recipes/llama3-code-math.yaml; recipes/toy.yaml is the
    default): validate it, write it over params.yaml, pin its hub branches to commits and
    regenerate dvc.yaml's download stages, merge deps and evaluate data deps (local inputs become DVC dependencies),
    printing every change. `mergeflow use params.yaml` does the last two after editing params.yaml
    by hand. Then `mergeflow plan` to see the cost, `dvc repro` to run."""
    from .recipes import use_recipe

    params, changes = use_recipe(recipe, params_file, dvc_yaml)
    for line in changes:
        click.echo(line)
    if not changes:
        click.echo(f"{params_file}, {dvc_yaml}: unchanged")
    click.echo(f"{params_file} <- {recipe}: experts {', '.join(params.experts)} ({params.models.source}), method {params.method}, alpha {params.alpha}")
    click.echo("next: `mergeflow plan` (cost), `dvc repro` (run), `dvc exp run -S alpha=0.3` (sweep); undo: `mergeflow use recipes/toy.yaml`")


@main.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=PATH, help="Params (or recipe) file to plan for.")
@click.option("--tflops", default=100.0, show_default=True, type=click.FloatRange(min=1e-6),
              help="Effective throughput of the gram pass, in TFLOP/s (an H100 reaches roughly 100-300 in bf16; 2 CPU cores about 0.05).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(params_file: Path, tflops: float, as_json: bool) -> None:
    """What the pipeline will cost before it runs: disk per stage, gram FLOPs and time per expert,
    the merge's peak memory and whether it fits this machine. Reads model configs only (toy params,
    local directories, the Hugging Face cache or the hub), never weights."""
    import json

    from .params import load_params
    from .plan import format_plan, make_plan

    params = load_params(params_file)
    result = make_plan(params, tflops=tflops)
    if params.tune.objective and params.tune.space:
        from .tune.config import load_config
        from .tune.search import estimate

        result["tune"] = estimate(Path("."), load_config(params_file))
    click.echo(json.dumps(result, indent=2) if as_json else format_plan(result) + (f"\n{result['tune']}" if "tune" in result else ""))


def run() -> None:
    """Entry point (`mergeflow`, `python -m mergeflow`): pins the CPU kernels first (README
    "Reproducibility"), then turns expected errors into one clear line and exit code 1."""
    pin_cpu_kernels()
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except (ValueError, OSError, KeyError) as err:  # OSError: missing files, hub errors
        click.echo(f"mergeflow: error: {err}", err=True)
        sys.exit(1)
