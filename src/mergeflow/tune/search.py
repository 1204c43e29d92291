"""`mergeflow tune`: an Optuna search whose every trial is one DVC experiment.

The study lives in an Optuna journal file, `.mergeflow/tune/<study>.log` (ignored by git and
DVC), so a killed tune continues where it stopped: finished trials are kept, a trial whose
experiment finished before the kill is read back from DVC, and one that did not is recorded as
failed (`interrupted`) and its params queued again. A trial whose experiment fails is recorded
as failed with the error line, and the search goes on. Trials evaluate the validation tasks
(`tune.objective`) only; once the study has all its trials, the best one is promoted: evaluated
once more with every task of `eval.tasks`, the held-out ones included, as experiment
`<study>-best-<trial>` (held-out scores are recorded, never used to select).
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna

from ..faults import fault_point
from .config import TuneConfig
from .experiments import experiment_names, head_commit, override, read_summary, run_experiment, score

log = logging.getLogger(__name__)
STATE_DIR = Path(".mergeflow") / "tune"
TRIAL_TARGET = "summary"  # the stage that writes the objective: trials stop there (no submission)


@dataclass
class Outcome:
    """What a tune run did, for the CLI to print and the tests to check."""

    study: str
    done: int
    target: int
    ran: list[str] = field(default_factory=list)        # experiments this run started
    recovered: list[str] = field(default_factory=list)  # trials read back from a killed run's experiments
    failed: list[str] = field(default_factory=list)
    best: Optional[dict] = None
    promoted: Optional[dict] = None
    stopped: str = ""                                   # why it stopped before the target, if it did


def storage_path(root: Path, study: str) -> Path:
    return root / STATE_DIR / f"{study}.log"


def open_study(root: Path, config: TuneConfig, *, create: bool = True):
    """The Optuna study of `tune.study` (created on first use), with its sampler."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = storage_path(root, config.tune.study)
    if not create and not path.is_file():
        raise ValueError(f"{path}: no study {config.tune.study!r} yet; run `mergeflow tune` first")
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(study_name=config.tune.study, storage=storage, direction=config.tune.direction, load_if_exists=True)
    study.sampler = make_sampler(config, len(study.get_trials(deepcopy=False)))
    recorded = study.user_attrs.get("config")
    if recorded is None:
        study.set_user_attr("config", config.fingerprint())
    elif recorded != config.fingerprint():
        raise ValueError(f"{path}: study {config.tune.study!r} was recorded with other tune params (space, objective, held_out, "
                         "direction, sampler, grid_points, seed or eval.tasks); set a new tune.study, or remove that file to start over")
    return study


def make_sampler(config: TuneConfig, recorded: int):
    """TPE, CMA-ES or a grid, seeded by `tune.seed` (TPE and CMA-ES: and the trials already
    recorded, so that a resumed study does not draw its first run's random points again)."""
    from .space import grid_space

    if config.tune.sampler == "grid":  # the seed orders the grid, which trials name by index: never vary it
        return _AskTellGrid(grid_space(config.dimensions, config.tune.grid_points), seed=config.tune.seed)
    seed = config.tune.seed * 1_000_003 + recorded
    if config.tune.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    # TPE samples at random until n_startup_trials are done: a third of the budget (at most its
    # default 10), so that a 12-trial study models the objective for 8 of them
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, config.target // 3)))


class _AskTellGrid(optuna.samplers.GridSampler):
    """Optuna's grid, which calls `study.stop()` once the grid is done: allowed only inside
    `study.optimize`; the tune loop stops at the grid's size itself."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def counted(study) -> list:
    """Finished trials that count toward `tune.trials` (an interrupted one is run again instead)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)) if not t.user_attrs.get("interrupted")]


def best_trial(study) -> Optional[Any]:
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if complete else None


def trial_result(config: TuneConfig, summary: dict, name: str) -> tuple[float, dict[str, float]]:
    scores = score(summary, config.tune.objective, name)
    return sum(scores.values()) / len(scores), scores


def recover(root: Path, baseline: str, config: TuneConfig, study, outcome: Outcome) -> None:
    """Trials a killed run left running: read back from their experiment, or failed and requeued."""
    from optuna.trial import Trial, TrialState

    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        name = frozen.user_attrs.get("experiment", "")
        summary = read_summary(root, frozen.user_attrs.get("baseline", baseline), name) if name else None
        trial = Trial(study, frozen._trial_id)
        if summary is not None:
            value, scores = trial_result(config, summary, name)
            trial.set_user_attr("scores", scores)
            study.tell(trial, value)
            outcome.recovered.append(name)
        else:
            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=TrialState.FAIL)
            if frozen.params:
                study.enqueue_trial(frozen.params, skip_if_exists=False)


def run_trial(root: Path, baseline: str, config: TuneConfig, study, outcome: Outcome) -> None:
    """Ask for a trial, run its DVC experiment, tell its objective (or its failure)."""
    from optuna.trial import TrialState

    trial = study.ask()
    values = {d.key: d.suggest(trial) for d in config.dimensions}
    name = f"{config.tune.study}-{trial.number}"
    if name in experiment_names(root, baseline):
        study.tell(trial, state=TrialState.FAIL)
        raise ValueError(f"experiment {name} already exists under this commit without a record in {storage_path(root, config.tune.study)}; "
                         "set a new tune.study, or `dvc exp remove` the old experiments")
    for key, value in (("experiment", name), ("baseline", baseline), ("values", values)):
        trial.set_user_attr(key, value)
    outcome.ran.append(name)
    ok, last = run_experiment(root, name, [override(k, v) for k, v in values.items()] + config.trial_overrides,
                              root / STATE_DIR / config.tune.study / f"{name}.txt", target=TRIAL_TARGET)
    fault_point("tune:experiment-done")
    if not ok:
        trial.set_user_attr("error", last)
        study.tell(trial, state=TrialState.FAIL)
        outcome.failed.append(name)
        return
    try:
        value, scores = trial_result(config, read_summary(root, baseline, name) or {}, name)
    except ValueError:
        study.tell(trial, state=TrialState.FAIL)
        raise
    trial.set_user_attr("scores", scores)
    study.tell(trial, value)


def promote(root: Path, baseline: str, config: TuneConfig, study, outcome: Outcome) -> Optional[dict]:
    """The best trial, evaluated once on every task of `eval.tasks` (held-out ones included) when
    its trials evaluated fewer; recorded in the study so that this runs once per best trial."""
    best = best_trial(study)
    if best is None:
        return None
    known = study.user_attrs.get("promoted")
    if known and known["trial"] == best.number:
        return known
    values = best.user_attrs["values"]
    record = {"trial": best.number, "experiment": best.user_attrs["experiment"], "values": values, "objective": best.value,
              "validation": best.user_attrs.get("scores", {}), "held_out": {}}
    if config.trial_overrides:
        name = f"{config.tune.study}-best-{best.number}"
        summary = read_summary(root, baseline, name)
        if summary is None:
            outcome.ran.append(name)
            ok, last = run_experiment(root, name, [override(k, v) for k, v in values.items()], root / STATE_DIR / config.tune.study / f"{name}.txt")
            if not ok:
                raise ValueError(f"experiment {name} (the best trial on every eval task) failed: {last}")
            summary = read_summary(root, baseline, name) or {}
        record.update(experiment=name, held_out=score(summary, config.tune.held_out, name))
    study.set_user_attr("promoted", record)
    return record


def median_trial_seconds(study) -> Optional[float]:
    """The measured cost of one trial (merge, evaluate, summary, submit through DVC)."""
    from optuna.trial import TrialState

    times = [(t.datetime_complete - t.datetime_start).total_seconds() for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
             if t.datetime_start and t.datetime_complete]
    return statistics.median(times) if times else None


def search(root: Path, config: TuneConfig, *, max_trials: Optional[int] = None, timeout: Optional[float] = None) -> Outcome:
    """Run (or continue) the study until it has `target` trials or a budget ends; then promote."""
    from filelock import FileLock, Timeout

    baseline = head_commit(root)
    lock = storage_path(root, config.tune.study).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(lock, timeout=0):
            return _search(root, baseline, config, max_trials, timeout)
    except Timeout:
        raise ValueError(f"{lock}: another `mergeflow tune` is running study {config.tune.study!r}; wait for it (or end it)") from None


def _search(root, baseline, config, max_trials, timeout) -> Outcome:
    from tqdm import tqdm

    study = open_study(root, config)
    outcome = Outcome(study=config.tune.study, done=0, target=config.target)
    recover(root, baseline, config, study, outcome)
    start = time.monotonic()
    done = len(counted(study))
    with tqdm(total=outcome.target, initial=min(done, outcome.target), unit="trial", desc=f"tune {config.tune.study}", file=sys.stderr, dynamic_ncols=True) as bar:
        _postfix(bar, study)
        while done < outcome.target:
            if max_trials is not None and len(outcome.ran) >= max_trials:
                outcome.stopped = f"--max-trials {max_trials}"
                break
            if timeout is not None and time.monotonic() - start >= timeout:
                outcome.stopped = f"--timeout {timeout:g}"
                break
            run_trial(root, baseline, config, study, outcome)
            done = len(counted(study))
            bar.update(1)
            _postfix(bar, study)
            bar.write(_line(study.trials[-1]), file=sys.stderr)
    outcome.done = done
    best = best_trial(study)
    outcome.best = None if best is None else {"trial": best.number, "objective": best.value, "values": best.user_attrs.get("values")}
    if done >= outcome.target:
        outcome.promoted = promote(root, baseline, config, study, outcome)
    return outcome


def _postfix(bar, study) -> None:
    best = best_trial(study)
    if best is not None:
        bar.set_postfix_str(f"best {best.value:.4g} (trial {best.number})")


def _line(trial) -> str:
    values = ", ".join(f"{k}={v}" for k, v in (trial.user_attrs.get("values") or {}).items())
    if trial.state.name == "COMPLETE":
        return f"trial {trial.number} ({values}): {trial.value:.4g}"
    return f"trial {trial.number} ({values}): failed: {trial.user_attrs.get('error', '')}"


def estimate(root: Path, config: TuneConfig) -> str:
    """One line for `mergeflow plan`: the time the study still needs, from its measured trials."""
    path = storage_path(root, config.tune.study)
    if not path.is_file():
        return (f"tune: study {config.tune.study!r}, {config.target} trials of merge + evaluate each: not measured yet "
                "(`mergeflow tune --max-trials 1` measures one trial; the plan then estimates the rest)")
    study = open_study(root, config, create=False)
    seconds = median_trial_seconds(study)
    left = max(0, config.target - len(counted(study)))
    extra = 1 if config.trial_overrides and "promoted" not in study.user_attrs else 0  # the promoted trial on every task
    if seconds is None:
        return f"tune: study {config.tune.study!r}: {left} trials left, none finished yet to measure"
    total = (left + extra) * seconds
    return (f"tune: study {config.tune.study!r}: {left} of {config.target} trials left{' + 1 promoted run' if extra else ''} "
            f"x {seconds:,.0f} s (median measured trial) = {total / 60:,.1f} min")
