"""Issue 14, the gram side: a gram run interrupted (Ctrl-C or SIGKILL) at every named phase of its
finalisation, then rerun, gives the bytes of an uninterrupted run and leaves no debris; `grams sum`
and the merge refuse parts and grams that do not belong together; bad calibration files, a full
disk and broken gram directories are one line naming the file and the fix. Each test asserts that
an earlier good output is left as it was."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import psutil
import pytest

from helpers import bytes_lost, dead_pid, killed_at, refused, report, run_cli, snapshot
from mergeflow import io
from mergeflow.grams import GramDir
from mergeflow.grams.collect import compute_grams
from mergeflow.grams.combine import sum_grams

pytestmark = pytest.mark.faults

# float64 sums and a 11 KB cap: one pass per layer, so a kill can fall between two layer groups
KWARGS = dict(max_length=16, batch_size=3, dtype="float64", max_gram_memory="11KB")
CLI_ARGS = ["--max-length", "16", "--batch-size", "3", "--dtype", "float64", "--max-gram-memory", "11KB"]
PHASES = [
    "grams:group-written",  # a finished layer file in the checkpoint, its record not yet
    "grams:group-recorded",  # file and record there, the checkpoint does not say so yet
    "grams:publish-begin",  # every layer finished, nothing published
    "grams:publish-linked",  # the first layer file linked into the checkpoint's publish/
    "grams:publish-indexed",  # publish/ complete with grams.json, not renamed
    "publish:exchanged",  # the new output swapped into place, the previous one inside the checkpoint's publish/
    "grams:publish-renamed",  # the new output in place, the checkpoint still there
    "grams:partial-unmarked",  # the checkpoint's fingerprint removed, the rest not yet
    "grams:partial-emptied",  # only the checkpoint's owner.json left
]


def debris(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".partial" in p.name or ".tmp-" in p.name)


@pytest.fixture(scope="module")
def reference(experts, calib_file, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """An uninterrupted run: the bytes every interrupted-then-rerun one must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "g"
    compute_grams(experts[0], calib_file, out, **KWARGS)
    return out, snapshot(out)


@pytest.fixture
def previous(gram_dirs, tmp_path) -> tuple[Path, dict[str, str]]:
    """An earlier good output at --out (another expert's grams): replaced only by a complete one."""
    out = tmp_path / "work" / "g"
    shutil.copytree(gram_dirs[1], out)
    return out, snapshot(out)


def interrupted_at(fault: str, monkeypatch, *args) -> None:
    """A gram run in this process, interrupted by Ctrl-C at fault point `fault`."""
    monkeypatch.setenv("MERGEFLOW_FAULT", fault)
    with pytest.raises(KeyboardInterrupt, match=f"MERGEFLOW_FAULT={fault}"):
        compute_grams(*args, **KWARGS)
    monkeypatch.delenv("MERGEFLOW_FAULT")


def check_rerun(record_property, experts, calib_file, reference, out, old, fault, signal_name) -> None:
    expected = reference[1]
    assert snapshot(out) in ({}, old, expected), f"{fault}: the output is neither absent nor complete after the interrupt"
    compute_grams(experts[0], calib_file, out, **KWARGS)
    assert snapshot(out) == expected
    assert debris(out.parent) == []
    report(record_property, f"{signal_name} at {fault} (gram finalisation)", "recovered: rerun gave the uninterrupted bytes, no debris", bytes_lost(expected, out))


@pytest.mark.parametrize("fault", PHASES)
def test_ctrl_c_at_every_phase_then_rerun_gives_the_same_bytes(fault, experts, calib_file, reference, previous, monkeypatch, record_property):
    out, old = previous
    interrupted_at(fault, monkeypatch, experts[0], calib_file, out)
    check_rerun(record_property, experts, calib_file, reference, out, old, fault, "SIGINT")


@pytest.mark.parametrize("fault", PHASES)
def test_sigkill_at_every_phase_then_rerun_gives_the_same_bytes(fault, experts, calib_file, reference, previous, record_property):
    out, old = previous
    killed_at(fault, ["grams", "--model", str(experts[0]), "--data", str(calib_file), "--out", str(out), "--force", *CLI_ARGS])
    check_rerun(record_property, experts, calib_file, reference, out, old, fault, "SIGKILL")


def test_a_cli_run_killed_after_publishing_is_finished_by_a_rerun_without_force(experts, calib_file, reference, previous, capsys, record_property):
    out, _ = previous
    args = ["grams", "--model", str(experts[0]), "--data", str(calib_file), "--out", str(out), *CLI_ARGS]
    killed_at("grams:publish-renamed", [*args, "--force"])
    assert snapshot(out) == reference[1] and (out.parent / ".g.partial").is_dir()
    code, err = run_cli(args, capsys)  # the same command, without --force
    assert code == 0, err
    assert snapshot(out) == reference[1] and debris(out.parent) == []
    report(record_property, "SIGKILL after the gram output was published, rerun without --force",
           "recovered: the output is the checkpoint's own, republished and the checkpoint removed", bytes_lost(reference[1], out))


def test_output_published_by_another_command_still_needs_force(experts, calib_file, reference, previous, capsys, record_property):
    out, _ = previous
    killed_at("grams:publish-renamed", ["grams", "--model", str(experts[0]), "--data", str(calib_file), "--out", str(out), "--force", *CLI_ARGS])
    other = ["grams", "--model", str(experts[0]), "--data", str(calib_file), "--out", str(out), *CLI_ARGS[:1], "8", *CLI_ARGS[2:]]
    code, err = run_cli(other, capsys)  # refused once its fingerprint is known, i.e. after loading the model
    assert (code, err.splitlines()[-1]) == (1, f"mergeflow: error: {out} already holds a gram; pass --force to replace it")
    assert snapshot(out) == reference[1] and (out.parent / ".g.partial" / "fingerprint").is_file()  # both left as they were
    report(record_property, "rerun with other parameters over grams a killed run published", "refused: --force needed, output and checkpoint kept", bytes_lost(reference[1], out))


@pytest.mark.parametrize("owner", ["live", "unrecorded"])
def test_a_checkpoint_of_a_live_or_unknown_run_is_not_touched(owner, experts, calib_file, tmp_path, record_property):
    partial = tmp_path / ".g.partial"
    partial.mkdir()
    (partial / "fingerprint").write_text("another run\n")
    parent = psutil.Process(os.getppid())  # alive for as long as this test runs
    why = f"{partial / io.OWNER_FILE} is missing or unreadable, so its owner cannot be proved dead"
    if owner == "live":
        io.record_owner(partial)
        record = json.loads((partial / io.OWNER_FILE).read_text())
        (partial / io.OWNER_FILE).write_text(json.dumps({**record, "pid": parent.pid, "start": round(parent.create_time() * 100)}))
        why = io.owner_status(partial)[1]
        assert why.startswith(f"PID {parent.pid} still runs")
    before = snapshot(partial)
    with pytest.raises(BlockingIOError) as err:
        compute_grams(experts[0], calib_file, tmp_path / "g", **KWARGS)
    assert str(err.value) == (
        f"{partial}: the checkpoint of a gram run for {tmp_path / 'g'} that may still be in use ({why}); "
        f"wait for its run to finish or stop it, then rerun (if none runs any more, remove it: rm -rf '{partial}')"
    )
    assert snapshot(partial) == before and not (tmp_path / "g").exists()
    report(record_property, f"gram run while a {owner} run owns the checkpoint", "refused: names the owner (or its missing record) and the rm -rf, checkpoint untouched")


def test_a_checkpoint_whose_owner_died_is_resumed_and_says_why(experts, calib_file, reference, tmp_path, monkeypatch, caplog, record_property):
    out = tmp_path / "g"
    interrupted_at("grams:publish-begin", monkeypatch, experts[0], calib_file, out)
    dead = dead_pid()
    owner_file = tmp_path / ".g.partial" / "owner.json"
    owner = json.loads(owner_file.read_text())
    owner_file.write_text(json.dumps({**owner, "pid": dead}))  # as if that finished process had written it
    with caplog.at_level("INFO", logger="mergeflow"):
        compute_grams(experts[0], calib_file, out, **KWARGS)
    assert f"a checkpoint of this command, left by an interrupted run (no process has PID {dead} any more" in caplog.text
    assert "layer group 2, batch 0" in caplog.text  # nothing recomputed: both groups were done
    assert snapshot(out) == reference[1] and debris(tmp_path) == []
    report(record_property, "stale gram checkpoint of a dead process", "recovered: resumed, the log names how it knows the owner is dead")


def test_a_checkpoint_missing_a_finished_layer_is_not_built_on(experts, calib_file, reference, tmp_path, monkeypatch, caplog, record_property):
    out = tmp_path / "g"
    interrupted_at("grams:publish-begin", monkeypatch, experts[0], calib_file, out)
    (tmp_path / ".g.partial" / "done" / "layer_000.safetensors").unlink()  # what the old code's move lost
    with caplog.at_level("WARNING", logger="mergeflow"):
        compute_grams(experts[0], calib_file, out, **KWARGS)
    assert f"{tmp_path / '.g.partial'}: finished layer files ['layer_000.safetensors'] are missing or damaged; starting over" in caplog.text
    assert snapshot(out) == reference[1] and debris(tmp_path) == []
    report(record_property, "gram checkpoint that lost a finished layer", "recovered: recomputed instead of publishing a broken dir")


# --- grams sum: verified, one model, one calibration, each shard once ------------------------------

@pytest.fixture(scope="module")
def shards(experts, calib_file, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("shards")
    for i in range(2):
        compute_grams(experts[0], calib_file, root / f"part{i}", max_length=16, shard=f"{i}/2")
    compute_grams(experts[1], calib_file, root / "other-model", max_length=16, shard="1/2")
    compute_grams(experts[0], calib_file, root / "other-length", max_length=8, shard="1/2")
    return root


def refused_sum(parts, out: Path, message: str, record_property, fault: str) -> None:
    before = snapshot(out)
    with pytest.raises(ValueError) as err:
        sum_grams(parts, out)
    assert str(err.value) == message
    assert snapshot(out) == before and debris(out.parent) == []
    report(record_property, fault, "refused: one line naming the part")


@pytest.fixture
def summed(shards, tmp_path) -> Path:
    """An earlier good sum at --out, which a refused sum must leave as it is."""
    sum_grams([shards / "part0", shards / "part1"], tmp_path / "sum")
    return tmp_path / "sum"


def test_sum_refuses_a_bit_flipped_part(experts, calib_file, shards, summed, tmp_path, record_property):
    bad = tmp_path / "flipped"
    shutil.copytree(shards / "part1", bad)
    data = bytearray((bad / "layer_001.safetensors").read_bytes())
    data[-5] ^= 0x01
    (bad / "layer_001.safetensors").write_bytes(bytes(data))
    message = (f"{bad / 'layer_001.safetensors'}: SHA-256 differs from the one in {bad / 'grams.json'}; the file is corrupt: "
               f"recompute it: `rm -rf {bad} && mergeflow grams --model {experts[0]} --data {calib_file} --out {bad} --max-length 16 --shard 1/2`")
    refused_sum([shards / "part0", bad], summed, message, record_property, "grams sum with a bit-flipped part")


def test_sum_refuses_parts_of_another_model(experts, shards, summed, record_property):
    message = f"{shards / 'other-model'}: grams of another model ({experts[1]}) than {shards / 'part0'} ({experts[0]}); only slices of one expert's grams can be added"
    refused_sum([shards / "part0", shards / "other-model"], summed, message, record_property, "grams sum of two experts' parts")


def test_sum_refuses_other_calibration(shards, summed, record_property):
    message = f"{shards / 'other-length'}: computed on other calibration data than {shards / 'part0'} (max_length 16 vs 8); only slices of one calibration run can be added"
    refused_sum([shards / "part0", shards / "other-length"], summed, message, record_property, "grams sum of parts with other calibration")


def test_sum_refuses_a_shard_twice(shards, summed, record_property):
    message = f"{shards / 'part1'}: shard 1/2 again (also {shards / 'part1'}); each slice may be added once"
    refused_sum([shards / "part0", shards / "part1", shards / "part1"], summed, message, record_property, "grams sum with a duplicate shard")


def test_sum_refuses_a_part_without_identity_records(shards, summed, tmp_path, record_property):
    old = tmp_path / "old-part"
    shutil.copytree(shards / "part1", old)
    meta = json.loads((old / "grams.json").read_text())
    for key in ("model_id", "calibration", "data"):
        del meta[key]
    (old / "grams.json").write_text(json.dumps(meta))
    message = f"{old / 'grams.json'}: records no calibration or model_id (written by an older mergeflow), so it cannot be checked against the other parts; recompute it"
    refused_sum([shards / "part0", old], summed, message, record_property, "grams sum with a part of an older mergeflow")


def test_sum_of_verified_shards_records_what_it_adds(shards, summed, record_property):
    meta = json.loads((summed / "grams.json").read_text())
    part = json.loads((shards / "part0" / "grams.json").read_text())
    assert meta["shards"] == ["0/2", "1/2"] and meta["model_id"] == part["model_id"] and meta["calibration"] == part["calibration"]
    assert GramDir.open(summed).num_tokens == sum(GramDir.open(shards / f"part{i}").num_tokens for i in range(2))
    report(record_property, "grams sum of two verified shards of one model (the control case)", "accepted: shards, model and calibration recorded")


# --- the merge: grams in the order of the experts ---------------------------------------------------

def test_merge_refuses_grams_in_another_order_than_the_experts(experts, gram_dirs, tmp_path, record_property):
    from mergeflow.merge import merge_models
    from mergeflow.methods import get_method

    out = tmp_path / "merged"
    merge_models(experts, get_method("average")(), out)
    before = snapshot(out)
    with pytest.raises(ValueError) as err:
        merge_models(experts, get_method("regmean")(), out, grams=[gram_dirs[1], gram_dirs[0]])
    assert str(err.value) == (
        f"{gram_dirs[1]}: holds the grams of {experts[1]}, but is given for {experts[0]}; "
        "list the gram directories in the order of the experts (--gram after --gram as --model after --model)"
    )
    assert snapshot(out) == before and debris(tmp_path) == []
    report(record_property, "merge with --gram in another order than --model", "refused: names the gram dir and both experts")


# --- recovery advice: the exact command, one stage only ---------------------------------------------

def test_recovery_advice_is_the_exact_command_of_one_stage(gram_dirs, tmp_path, monkeypatch, record_property):
    repo = tmp_path / "repo"
    grams = repo / "models" / "grams" / "math"
    shutil.copytree(gram_dirs[0], grams)
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages:\n  download:\n    outs:\n    - path: models/experts\n"
                                   "  gram@math:\n    cmd: python stages/gram.py\n    outs:\n    - path: models/grams/math\n")
    layer = grams / "layer_001.safetensors"
    data = bytearray(layer.read_bytes())
    data[-5] ^= 0x01
    layer.write_bytes(bytes(data))
    monkeypatch.chdir(repo)
    with pytest.raises(ValueError) as err:
        GramDir.open("models/grams/math").verify()
    assert str(err.value) == (
        "models/grams/math/layer_001.safetensors: SHA-256 differs from the one in models/grams/math/grams.json; the file is corrupt: "
        'fetch it again: `find "$(dvc cache dir)" -samefile "$(readlink -f models/grams/math/layer_001.safetensors)" -delete '
        "&& rm -rf models/grams/math && dvc pull gram@math` (or recompute it: `dvc repro -s -f gram@math`)"
    )
    layer.unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"layer_001\.safetensors: listed in .*grams\.json but missing; fetch it again: `cd {repo} && rm -rf models/grams/math && dvc pull gram@math` \(or recompute it: `cd {repo} && dvc repro -s -f gram@math`\)$"):
        GramDir.open(grams)
    report(record_property, "corrupt or missing gram file in a DVC pipeline", "refused: exact recovery commands, `dvc repro -s` of that stage only")


# --- a full disk and bad calibration files -----------------------------------------------------------

def test_disk_full_is_one_line_and_the_rerun_keeps_the_finished_layers(experts, calib_file, reference, previous, monkeypatch, record_property):
    from safetensors import SafetensorError

    from mergeflow.grams import format as gram_format

    out, old = previous
    real, calls = gram_format.save_file, []

    def fills_the_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second layer's file: the first one is finished and kept
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(gram_format, "save_file", fills_the_disk)
    with pytest.raises(OSError) as err:
        compute_grams(experts[0], calib_file, out, **KWARGS)
    done = out.parent / ".g.partial" / "done"
    assert str(err.value).startswith(f"{done / 'layer_001.safetensors'}: no space left on the device; ")
    assert str(err.value).endswith("GB free there: free space on that disk (or write the grams to another one) and rerun the same command; "
                                   "layers already finished are kept and not computed again")
    assert "\n" not in str(err.value) and snapshot(out) == old and (done / "layer_000.safetensors").is_file()
    monkeypatch.setattr(gram_format, "save_file", real)
    compute_grams(experts[0], calib_file, out, **KWARGS)
    assert snapshot(out) == reference[1] and debris(out.parent) == []
    report(record_property, "disk full while writing grams (SafetensorError)", "refused: one line with the path; rerun resumed")


def test_enospc_from_a_plain_write_names_the_path(tmp_path, record_property):
    import errno

    from mergeflow.grams.format import disk_errors

    with pytest.raises(OSError, match=rf"^{tmp_path / 'x.json'}: no space left on the device; [\d.]+ GB free there: free space on that disk \(or write the grams to another one\) and rerun the same command$"):
        with disk_errors(tmp_path / "x.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
    report(record_property, "disk full writing a gram record (plain write, not safetensors)", "refused: one line naming the path and the free space")


BAD_CALIBRATION = {
    "latin1.jsonl": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2 is not UTF-8 (byte 0xe9 at column 14); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path} > fixed.jsonl)"),
    "latin1.csv": (b"text\ncaf\xe9\n", "line 2 is not UTF-8 (byte 0xe9 at column 4); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path} > fixed.csv)"),
    "newlines.jsonl": (b"\n\n\n", "holds only blank lines; grams need calibration text: one row per line with a text field"),
    "nul.jsonl": (b'{"text": "ok"}\n\0\0\0\0\n', "line 2 holds a NUL byte, so this is not a text file; write the calibration data as UTF-8 JSON lines or CSV"),
    "header-only.csv": (b"text\n", "holds no rows; grams need calibration text: add rows"),
    "number.jsonl": (b'{"text": "ok"}\n{"text": 42}\n', "row 2: 'text' is a number (42), not text or chat messages; write it as a string or fix the row"),
    "dict.jsonl": (b'{"text": {"body": "x"}}\n{"text": "ok"}\n', "row 1: 'text' is an object ({'body': 'x'}), not text or chat messages; write it as a string or fix the row"),
}


@pytest.mark.parametrize("name", sorted(BAD_CALIBRATION))
def test_bad_calibration_file_is_one_line_naming_it(name, experts, previous, record_property):
    out, old = previous
    content, reason = BAD_CALIBRATION[name]
    path = out.parent / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        compute_grams(experts[0], path, out, **KWARGS)
    assert str(err.value) == f"{path}: " + reason.replace("{path}", str(path))
    assert snapshot(out) == old and debris(out.parent) == []
    report(record_property, f"calibration file: {name}", "refused: one line naming the file (and line or row)")


def test_cli_reports_a_bad_calibration_file_in_one_line(experts, tmp_path, capsys, record_property):
    data = tmp_path / "nul.jsonl"
    data.write_bytes(b"\0\0\0")
    message = f"{data}: line 1 holds a NUL byte, so this is not a text file; write the calibration data as UTF-8 JSON lines or CSV"
    report(record_property, "mergeflow grams on a binary calibration file", "refused: one line, no traceback",
           refused(["grams", "--model", str(experts[0]), "--data", str(data), "--out", str(tmp_path / "g")], capsys, tmp_path / "g", message))


def test_grams_never_replace_what_mergeflow_did_not_write(experts, calib_file, tmp_path, record_property):
    victim = tmp_path / "victim"
    shutil.copytree(experts[0], victim)
    before = snapshot(victim)
    with pytest.raises(FileExistsError) as err:
        compute_grams(experts[0], calib_file, victim, **KWARGS)
    assert str(err.value) == f"{victim}: --out exists and is not a gram mergeflow wrote; mergeflow never replaces it: choose another --out or remove it yourself"
    assert snapshot(victim) == before and debris(tmp_path) == []
    report(record_property, "grams --out naming a model directory", "refused: names the directory")


def force_case(case: str, experts, calib_file, gram_dirs, tmp: Path) -> tuple[list[str], Path, str]:
    """(mergeflow arguments, the path they must leave alone, the one-line refusal) of each case."""
    compute = ["grams", "compute", "--model", str(experts[0]), "--data", str(calib_file)]
    if case == "sum --out <a part>":
        parts = [shutil.copytree(g, tmp / f"p{i}") for i, g in enumerate(gram_dirs)]
        return ["grams", "sum", *map(str, parts), "--out", str(parts[0]), "--force"], parts[0], f"{parts[0]}: --out is the input {parts[0]}; writing there would destroy it: choose another --out"
    if case == "compute --out <a folder holding the model>":
        victim = tmp / "victim"
        shutil.copytree(experts[0], victim / "expert")
        args = ["grams", "compute", "--model", str(victim / "expert"), "--data", str(calib_file), "--out", str(victim), "--force"]
        return args, victim, f"{victim}: --out contains the input {victim / 'expert'}; writing there would destroy it: choose another --out"
    if case == "compute --out <a plain file>":
        victim = tmp / "thesis.pdf"
        victim.write_bytes(b"%PDF-1.7 years of work")
        return [*compute, "--out", str(victim), "--force"], victim, f"{victim}: --out is a file, not a gram directory mergeflow wrote; mergeflow never replaces it: choose another --out or remove it yourself"
    victim = shutil.copytree(gram_dirs[1], tmp / "g")
    if case == "compute over earlier grams without --force":
        return [*compute, "--out", str(victim)], victim, f"{victim} already holds a gram; pass --force to replace it"
    assert case == "import --out <grams plus the user's files>"
    (victim / "notes.txt").write_text("mine\n")
    (victim / "runs").mkdir()
    args = ["grams", "import", str(calib_file), "--model", str(experts[0]), "--out", str(victim), "--force"]  # refused before the file is read
    return args, victim, f"{victim}: --out holds files mergeflow did not write (notes.txt, runs/); mergeflow never replaces them: move them away or choose another --out"


@pytest.mark.parametrize("case", ["sum --out <a part>", "compute --out <a folder holding the model>", "compute --out <a plain file>",
                                  "compute over earlier grams without --force", "import --out <grams plus the user's files>"])
def test_gram_commands_replace_only_their_own_earlier_grams(case, experts, calib_file, gram_dirs, tmp_path, capsys, record_property):
    args, victim, message = force_case(case, experts, calib_file, gram_dirs, tmp_path)
    lost = refused(args, capsys, victim, message)
    assert debris(tmp_path) == []
    report(record_property, f"mergeflow grams {case}", "refused: one line naming --out and the fix", lost)


def test_gram_force_replaces_earlier_grams_whole(experts, calib_file, reference, previous, capsys, record_property):
    out, _ = previous
    code, err = run_cli(["grams", "compute", "--model", str(experts[0]), "--data", str(calib_file), "--out", str(out), "--force", *CLI_ARGS], capsys)
    assert code == 0, err
    assert snapshot(out) == reference[1] and debris(out.parent) == []
    report(record_property, "mergeflow grams compute --force over its own earlier grams", "recovered: replaced whole in one swap, no debris")
