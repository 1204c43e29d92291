"""Issue 14, merge side: a merge interrupted at every phase of its write and publish (Ctrl-C and
SIGKILL, injected with MERGEFLOW_FAULT: no sleeps), what `--force` may replace, stale temporaries,
and the faults that used to pass silently or without a path (full disk, configs that disagree,
mixed dtypes, a flipped exponent bit)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import bytes_lost, dead_pid, killed_at, refused, report, run_cli, snapshot
from mergeflow import io
from mergeflow.merge import MERGE_CONFIG, merge_models
from mergeflow.methods import get_method

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.faults

# Every fault point a merge passes, in order: before the temporary exists, while shards stream,
# after the shards, after the model files and config, just before the rename, between the atomic
# exchange and the removal of the old model, after publishing.
POINTS = ["merge:checked", "merge:tensor-written", "merge:shards-written", "atomic_file:before-rename", "merge:files-written",
          "publish:before", "publish:exchanged", "publish:after"]


def average():
    return get_method("average")()


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def reference(experts, tmp_path_factory) -> dict[str, bytes]:
    """The bytes of an uninterrupted merge (average of the two experts)."""
    out = tmp_path_factory.mktemp("reference") / "merged"
    merge_models(experts, average(), out)
    return snapshot(out)


@pytest.fixture
def repo(experts, tmp_path) -> Path:
    """A git repository with the shipped .gitignore and, in models/merged, an earlier good model
    (another merge: weights 0.8/0.2), ignored the way DVC ignores its outputs."""
    repo = tmp_path / "repo"
    (repo / "models").mkdir(parents=True)
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    (repo / "models" / ".gitignore").write_text("/merged\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    merge_models(experts, get_method("average")({"weights": [0.8, 0.2]}), repo / "models" / "merged")
    return repo


def merge_args(experts, out: Path) -> list[str]:
    return ["merge", "--method", "average", "--model", str(experts[0]), "--model", str(experts[1]), "--out", str(out), "--force"]


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
@pytest.mark.parametrize("point", POINTS)
def test_merge_interrupted_at_every_phase_then_rerun(experts, reference, repo, monkeypatch, caplog, record_property, point, how):
    """An interrupt leaves the earlier model or the new one, whole; the rerun gives the uninterrupted
    bytes, removes the dead run's temporary (saying how it knew) and git sees nothing."""
    out = repo / "models" / "merged"
    earlier = snapshot(out)
    if how == "sigint":
        monkeypatch.setenv("MERGEFLOW_FAULT", point)
        with pytest.raises(KeyboardInterrupt):
            merge_models(experts, average(), out, overwrite=True)
        monkeypatch.delenv("MERGEFLOW_FAULT")
    else:
        killed_at(point, merge_args(experts, out))
    interrupted = snapshot(out)
    assert interrupted == (reference if point in ("publish:exchanged", "publish:after") else earlier)  # whole, never a mix
    assert git(repo, "status", "--porcelain") == ""  # debris, if any, is ignored by the shipped .gitignore
    debris = [p.name for p in (repo / "models").iterdir() if p.name.startswith(".merged.")]
    if how == "sigint":
        assert debris == []  # Ctrl-C cleans up after itself

    caplog.set_level(logging.INFO, logger="mergeflow.io")
    merge_models(experts, average(), out, overwrite=True)
    assert snapshot(out) == reference
    assert sorted(p.name for p in (repo / "models").iterdir()) == [".gitignore", "merged"]
    assert git(repo, "status", "--porcelain", "--ignored") == "!! models/merged/\n"
    for name in debris:
        assert f"removed {repo / 'models' / name}, left by an interrupted run: its owner is dead (no process has PID" in caplog.text
    report(record_property, f"{'Ctrl-C' if how == 'sigint' else 'SIGKILL'} during merge at {point}", f"recovered: {'earlier' if interrupted == earlier else 'new'} model whole, rerun identical, {len(debris)} stale temporary removed", bytes_lost(earlier, out) if interrupted not in (earlier, reference) else 0)


# --- what --force may replace ----------------------------------------------------------------------

def test_force_never_replaces_an_input_expert(experts, tmp_path, capsys, record_property):
    victim = tmp_path / "expert"
    shutil.copytree(experts[1], victim)
    lost = refused(["merge", "--method", "average", "--model", str(experts[0]), "--model", str(victim), "--out", str(victim), "--force"], capsys, victim, f"{victim}: --out is the input {victim}; writing there would destroy it: choose another --out")
    report(record_property, "merge --force --out <an input expert>", "refused: --out is the input", lost)


def test_force_never_replaces_a_directory_holding_the_inputs(experts, tmp_path, capsys, record_property):
    victim = tmp_path / "victim"
    for i, e in enumerate(experts):
        shutil.copytree(e, victim / f"e{i}")
    (victim / "notes.txt").write_text("mine\n")
    lost = refused(["merge", "--method", "average", "--model", str(victim / "e0"), "--model", str(victim / "e1"), "--out", str(victim), "--force"], capsys, victim, f"{victim}: --out contains the input {victim / 'e0'}; writing there would destroy it: choose another --out")
    report(record_property, "merge --force --out <a folder holding the experts>", "refused: --out contains an input", lost)


def test_force_never_replaces_a_plain_file(experts, tmp_path, capsys, record_property):
    victim = tmp_path / "thesis.pdf"
    victim.write_bytes(b"%PDF-1.7 years of work")
    lost = refused(merge_args(experts, victim), capsys, victim, f"{victim}: --out is a file, not a merged model directory mergeflow wrote; mergeflow never replaces it: choose another --out or remove it yourself")
    report(record_property, "merge --force --out <a plain file>", "refused: a file", lost)


def test_force_never_replaces_a_directory_mergeflow_did_not_write(experts, tmp_path, capsys, record_property):
    victim = tmp_path / "photos"
    victim.mkdir()
    (victim / "a.jpg").write_bytes(b"\xff\xd8")
    lost = refused([*merge_args(experts, victim)], capsys, victim, f"{victim}: --out exists and is not a merged model mergeflow wrote; mergeflow never replaces it: choose another --out or remove it yourself")
    report(record_property, "merge --force --out <a foreign directory>", "refused: not mergeflow's", lost)


def test_force_refuses_a_merged_model_with_foreign_files_naming_them(experts, tmp_path, capsys, record_property):
    out = tmp_path / "merged"
    merge_models(experts, average(), out)
    (out / "notes.txt").write_text("my eval notes\n")
    (out / "runs").mkdir()
    lost = refused([*merge_args(experts, out)], capsys, out, f"{out}: --out holds files mergeflow did not write (notes.txt, runs/); mergeflow never replaces them: move them away or choose another --out")
    report(record_property, "merge --force over a merged model plus the user's files", "refused, naming the foreign files", lost)


def test_without_force_an_existing_merged_model_is_kept(experts, tmp_path, capsys, record_property):
    out = tmp_path / "merged"
    merge_models(experts, get_method("average")({"weights": [0.8, 0.2]}), out)
    lost = refused(merge_args(experts, out)[:-1], capsys, out, f"{out} already holds a merged model; pass --force to replace it")
    assert sorted(json.loads((out / MERGE_CONFIG).read_text())["files"]) == sorted(snapshot(out))  # what --force may replace
    report(record_property, "merge over an existing model without --force", "refused: pass --force", lost)


# --- stale temporaries ---------------------------------------------------------------------------

def test_stale_temporaries_are_removed_only_when_their_owner_is_provably_dead(tmp_path, caplog, record_property):
    out = tmp_path / "merged"
    me = io.owner_stamp()
    dead = tmp_path / f".merged.tmp-{dead_pid()}-{io.start_time(os.getpid())}-{io.boot_id()}-0000"
    rebooted = tmp_path / f".merged.tmp-{os.getpid()}-{io.start_time(os.getpid())}-{'0' * 8 if io.boot_id() != '0' * 8 else '1' * 8}-0001"
    reused = tmp_path / f".merged.tmp-{os.getpid()}-{io.start_time(os.getpid()) - 500}-{io.boot_id()}-0002"
    alive = tmp_path / f".merged.tmp-{me}-0003"
    legacy = tmp_path / ".merged.tmp-k2j4h5"
    other = tmp_path / f".mergedx.tmp-{dead_pid()}-1-{io.boot_id()}-0004"  # another output's
    for d in (dead, rebooted, reused, alive, legacy, other):
        d.mkdir()
    caplog.set_level(logging.INFO, logger="mergeflow.io")
    assert io.remove_stale(out) == sorted([dead, rebooted, reused])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, legacy.name, other.name])
    assert "its owner is dead (no process has PID" in caplog.text
    assert "this machine has booted since" in caplog.text
    assert "now belongs to another process" in caplog.text
    assert f"{legacy}: a temporary of an older mergeflow (no owner recorded); remove it by hand" in caplog.text
    report(record_property, "temporaries left by dead (gone, rebooted, reused PID), live and older runs", "recovered: the dead ones removed, saying how; live and unprovable ones kept")


def test_partial_dirs_record_their_owner(tmp_path, record_property):
    partial = tmp_path / ".math.partial"
    partial.mkdir()
    assert io.owner_status(partial)[0] is True  # no record: nothing proves it dead
    io.record_owner(partial)
    alive, why = io.owner_status(partial)
    assert alive and why.startswith(f"PID {os.getpid()} still runs")
    record = json.loads((partial / io.OWNER_FILE).read_text())
    (partial / io.OWNER_FILE).write_text(json.dumps({**record, "pid": dead_pid()}))
    alive, why = io.owner_status(partial)
    assert not alive and why.startswith("no process has PID")
    report(record_property, "a .partial checkpoint whose owner died", "recovered: owner.json proves it dead; a live or unrecorded owner is left alone")


def test_shipped_ignore_files_cover_temporaries_and_partials(tmp_path, record_property):
    """git and DVC both ignore what an interrupted run leaves (git check-ignore; DVC reads .dvcignore)."""
    git(tmp_path, "init", "-q")
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    paths = ["models/.merged.tmp-123-456-0a1b2c3d-beef/model.safetensors", "models/grams/.math.partial/done/layer_000.safetensors", "data/.test.csv.tmp-1-2-0a1b2c3d-ff"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=tmp_path, capture_output=True, text=True).stdout.split()
    assert ignored == paths
    dvcignore = (ROOT / ".dvcignore").read_text().split()
    assert ".*.tmp-*" in dvcignore and ".*.partial" in dvcignore
    report(record_property, "debris of a killed run before the next run: git add -A / dvc", "ignored: .gitignore and .dvcignore cover .*.tmp-* and .*.partial")


# --- faults that used to pass silently or without a path -----------------------------------------

def corrupt(expert: Path, dest: Path, edit) -> Path:
    shutil.copytree(expert, dest)
    tensors = load_file(dest / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.fixture
def earlier(experts, tmp_path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "merged"
    merge_models(experts, get_method("average")({"weights": [0.8, 0.2]}), out)
    return out, snapshot(out)


def test_full_disk_during_merge_names_the_output_and_keeps_the_earlier_model(experts, earlier, monkeypatch, record_property):
    from mergeflow.checkpoint import ShardedWriter

    out, before = earlier
    real_write, calls = ShardedWriter.write, []

    def write(self, name, block):
        calls.append(name)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, name, block)

    monkeypatch.setattr(ShardedWriter, "write", write)
    with pytest.raises(OSError) as err:
        merge_models(experts, average(), out)
    assert str(err.value) == f"{out}: no space left on the device while writing the merged model (27.2 KB of weights); nothing was kept: free space or choose --out on a larger disk"
    assert err.value.errno == errno.ENOSPC
    assert snapshot(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["merged"]
    report(record_property, "disk full (ENOSPC) during merge", "refused: one line naming --out, earlier model kept", bytes_lost(before, out))


def test_too_little_free_space_is_refused_before_writing(experts, earlier, monkeypatch, record_property):
    out, before = earlier
    monkeypatch.setattr("mergeflow.merge.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match=rf"^{out}: the merged model needs 27\.2 KB but only 1\.0 KB is free there; free space or choose --out on a larger disk$"):
        merge_models(experts, average(), out)
    assert snapshot(out) == before
    report(record_property, "too little free space for the merged model", "refused before writing, naming --out and the sizes", bytes_lost(before, out))


def with_config(expert: Path, dest: Path, **changes) -> Path:
    shutil.copytree(expert, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, **changes}))
    return dest


def test_experts_whose_architecture_keys_differ_are_refused(experts, earlier, tmp_path, record_property):
    out, before = earlier
    other = with_config(experts[1], tmp_path / "gelu", hidden_act="gelu")
    with pytest.raises(ValueError, match=rf"^experts differ in config\.json 'hidden_act': 'silu' in {experts[0]}, 'gelu' in {other}; their tensors mean different things"):
        merge_models([experts[0], other], average(), out)
    assert snapshot(out) == before
    report(record_property, "experts whose configs differ (hidden_act) but shapes match", "refused, naming the key", bytes_lost(before, out))


def test_experts_whose_rope_differs_are_merged_with_a_warning(experts, tmp_path, caplog, record_property):
    other = with_config(experts[1], tmp_path / "rope", max_position_embeddings=128)
    merge_models([experts[0], other], average(), tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"experts differ in config.json 'max_position_embeddings' (64 in {experts[0]}, 128 in {other}): the merged model keeps {experts[0]}'s"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["max_position_embeddings"] == 64
    report(record_property, "experts whose max_position_embeddings differ", "warned: the output keeps the first expert's")


def test_mixed_dtype_experts_get_one_warning_naming_the_output_dtype(experts, tmp_path, caplog, record_property):
    bf16 = corrupt(experts[1], tmp_path / "bf16", lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    merge_models([bf16, experts[0]], average(), tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"experts store different dtypes (bfloat16 in {bf16}, float32 in {experts[0]}, 21 tensors): the merge computes in float32 and writes bfloat16, the dtype of the first expert (--model order)"
    )
    assert {v.dtype for v in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}
    report(record_property, "mixed fp32/bf16 experts", "warned: output dtype = first expert's, said why")


def test_flipped_exponent_bit_is_refused_naming_tensor_and_expert(experts, earlier, tmp_path, record_property):
    out, before = earlier
    name = "model.layers.1.mlp.up_proj.weight"

    def flip(tensors):
        bits = tensors[name].view(torch.int32)
        bits[0, 0] ^= 1 << 30  # the exponent's top bit: 0.05 becomes ~1.7e37
    bad = corrupt(experts[1], tmp_path / "flipped", flip)
    with pytest.raises(ValueError, match=rf"^merged tensor {name}: \|value\| \S+e\+3\d > 1e\+04, from {bad} \(\|value\| \S+e\+3\d\), probably a corrupted weight .*re-download or restore that expert; or pass --no-magnitude-check \(params\.yaml: merge\.check_magnitude: false\)$"):
        merge_models([experts[0], bad], average(), out)
    assert snapshot(out) == before
    merge_models([experts[0], bad], average(), tmp_path / "unchecked", check_magnitudes=False)  # the way out, when meant
    assert load_file(tmp_path / "unchecked" / "model.safetensors")[name].abs().max() > 1e30
    report(record_property, "exponent bit flip in an expert's weight", "refused, naming tensor and expert (--no-magnitude-check to accept)", bytes_lost(before, out))


def test_evaluate_logs_folder_is_replaced_only_when_it_holds_sample_logs(experts, tmp_path, record_property):
    """`mergeflow evaluate --logs DIR` replaces DIR with the new per-sample logs: only earlier logs may go."""
    from mergeflow.evaluation.harness import check_log_dir, write_samples

    victim = tmp_path / "documents"
    write_samples({"toy_math": [{"doc": 1}]}, victim)  # sample logs mergeflow wrote...
    (victim / "thesis.tex").write_text("years of work\n")  # ...beside which the user put their own file
    before = snapshot(victim)
    with pytest.raises(FileExistsError, match=rf"^{victim}: --logs holds files mergeflow did not write \(thesis\.tex\); mergeflow never replaces them"):
        write_samples({"toy_math": [{"doc": 1}]}, victim)
    with pytest.raises(ValueError, match=rf"^{experts[0].parent}: --logs contains the input {experts[0]}; writing there would destroy it"):
        check_log_dir(experts[0].parent, [experts[0]])
    assert snapshot(victim) == before
    lost = bytes_lost(before, victim)
    data = tmp_path / "data"  # .jsonl files without mergeflow's index may be anybody's (calibration data): refused
    data.mkdir()
    (data / "math.jsonl").write_text('{"text": "1+1=2"}\n')
    with pytest.raises(FileExistsError, match=rf"^{data}: --logs exists and is not a sample-log mergeflow wrote"):
        write_samples({"toy_math": [{"doc": 1}]}, data)
    assert snapshot(data) == {"math.jsonl": b'{"text": "1+1=2"}\n'}
    (victim / "thesis.tex").unlink()
    write_samples({"toy_code": [{"doc": 2}]}, victim)  # earlier logs mergeflow wrote: replaced
    assert snapshot(victim) == {"toy_code.jsonl": b'{"doc": 2}\n', "mergeflow_samples.json": b'{\n  "files": [\n    "toy_code.jsonl"\n  ]\n}\n'}
    report(record_property, "evaluate --logs <a folder holding other files, or the model>", "refused, naming the foreign files (checked before evaluating)", lost)


def test_claim_dir_refuses_a_live_owner_and_takes_over_from_a_dead_one(tmp_path, record_property):
    partial = tmp_path / ".math.partial"
    assert io.claim_dir(partial) is None and io.claim_dir(partial) is None  # new, then already ours
    record = json.loads((partial / io.OWNER_FILE).read_text())
    parent = psutil_parent()
    (partial / io.OWNER_FILE).write_text(json.dumps({**record, "pid": parent.pid, "start": round(parent.create_time() * 100)}))
    with pytest.raises(BlockingIOError, match=rf"^{partial}: a run's working directory that may still be in use \(PID {parent.pid} still runs"):
        io.claim_dir(partial)
    (partial / io.OWNER_FILE).write_text(json.dumps({**record, "pid": dead_pid()}))
    assert io.claim_dir(partial).startswith("no process has PID")
    assert json.loads((partial / io.OWNER_FILE).read_text())["pid"] == os.getpid()
    report(record_property, "two runs writing one .partial checkpoint", "refused while the other runs; taken over once it is provably dead")


def psutil_parent():
    import psutil

    return psutil.Process(os.getpid()).parent()


def test_publish_without_an_atomic_exchange_still_replaces_whole(tmp_path, monkeypatch, record_property):
    """Where renameat2 is missing (not Linux, old kernels): two renames, the old model removed after."""
    out = tmp_path / "out"
    with io.atomic_dir(out) as tmp:
        (tmp / "a").write_text("old")
    monkeypatch.setattr(io, "exchange", lambda a, b: False)
    with io.atomic_dir(out) as tmp:
        (tmp / "a").write_text("new")
    assert snapshot(out) == {"a": b"new"} and [p.name for p in tmp_path.iterdir()] == ["out"]
    report(record_property, "publishing where renameat2 is missing", "recovered: two renames, nothing left behind")


def test_force_on_a_merged_model_of_an_older_mergeflow_knows_its_files(experts, tmp_path, capsys, record_property):
    """Before `files` was recorded in mergeflow_merge.json: the usual model files are mergeflow's, nothing else."""
    out = tmp_path / "merged"
    merge_models(experts, average(), out)
    config = json.loads((out / MERGE_CONFIG).read_text())
    del config["files"]
    (out / MERGE_CONFIG).write_text(json.dumps(config))
    (out / "notes.md").write_text("mine\n")
    before = snapshot(out)
    code, err = run_cli([*merge_args(experts, out)], capsys)
    assert code == 1 and "--out holds files mergeflow did not write (notes.md)" in err
    assert snapshot(out) == before
    lost = bytes_lost(before, out)
    (out / "notes.md").unlink()
    assert run_cli([*merge_args(experts, out)], capsys)[0] == 0
    assert "files" in json.loads((out / MERGE_CONFIG).read_text())
    report(record_property, "merge --force over an older merged model plus the user's files", "refused, naming them; replaced once they are gone", lost)
