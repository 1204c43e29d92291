"""Grams at scale: exact under both paddings, symmetric product, layer groups, resume after a kill,
torchrun, shards summed, import of published pickles, integrity checks and data formats."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from mergeflow.grams import GramDir
from mergeflow.grams.accumulate import add_gram, symmetric
from mergeflow.grams.collect import compute_grams
from mergeflow.params import GramParams
from mergeflow.grams.combine import sum_grams
from mergeflow.grams.importer import import_grams
from test_grams import direct_grams

TEXTS = ["12+5=17", "rev(abc)=cba", "cp(x)=x", "9+9=18 and more text here", "a", "hello world 123", "rev(hgfedcba)=abcdefgh"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def all_grams(path: Path) -> dict[str, torch.Tensor]:
    g = GramDir.open(path)
    return {m: g.load(m) for m in g.modules}


def assert_same_grams(a: Path, b: Path, exact: bool = True) -> None:
    ga, gb = GramDir.open(a), GramDir.open(b)
    assert ga.num_tokens == gb.num_tokens and set(ga.modules) == set(gb.modules)
    for m in ga.modules:
        if exact:
            assert torch.equal(ga.load(m), gb.load(m)), m
        else:
            # other batch compositions round the float32 forward differently
            torch.testing.assert_close(ga.load(m), gb.load(m), rtol=1e-5, atol=1e-5, msg=lambda s: f"{m}: {s}")


def padded_on(expert: Path, side: str, dest: Path) -> Path:
    """A copy of `expert` whose tokenizer pads on `side`."""
    shutil.copytree(expert, dest)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    (dest / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": side}))
    return dest


@pytest.mark.parametrize("side", ["right", "left"])
def test_float64_grams_equal_direct_computation_with_either_padding(side, experts, calib_file, tmp_path):
    from transformers import AutoTokenizer

    model = padded_on(experts[0], side, tmp_path / "expert")
    assert AutoTokenizer.from_pretrained(model).padding_side == side
    n = compute_grams(model, calib_file, tmp_path / "g", GramParams(max_length=16, batch_size=3, dtype="float64"))
    expected, tokens = direct_grams(experts[0], TEXTS, max_length=16)
    grams = GramDir.open(tmp_path / "g")
    assert n == tokens == grams.num_tokens
    for module, value in expected.items():
        loaded = grams.load(module)
        assert loaded.dtype == torch.float64
        torch.testing.assert_close(loaded, value, rtol=1e-5, atol=1e-5, msg=lambda m: f"{module} ({side} padding): {m}")


def test_symmetric_product_equals_the_full_product():
    torch.manual_seed(0)
    x = torch.randn(50, 600, dtype=torch.float64)
    upper = torch.zeros(600, 600, dtype=torch.float64)
    add_gram(upper, x)
    add_gram(upper, x[:20])
    assert upper.tril(-1).abs().sum() > 0 or True  # below the diagonal is scratch
    torch.testing.assert_close(symmetric(upper), x.T @ x + x[:20].T @ x[:20])
    assert torch.count_nonzero(upper.tril(-300)) == 0  # the lower-left panels were never computed


def test_layer_groups_give_the_same_grams_as_one_pass(experts, calib_file, gram_dirs, tmp_path, caplog):
    # one layer's distinct inputs: 3 x 16^2 + 24^2 floats = 5376 bytes; a 6 KB cap forces one pass per layer
    with caplog.at_level("INFO", logger="mergeflow"):
        compute_grams(experts[0], calib_file, tmp_path / "g", GramParams(max_length=16, batch_size=3, max_gram_memory="6KB"))
    assert "2 pass(es)" in caplog.text
    assert_same_grams(tmp_path / "g", gram_dirs[0])
    with pytest.raises(ValueError, match=r"max_gram_memory 1000 bytes is below .* one layer \(layer_000\.safetensors\)"):
        compute_grams(experts[0], calib_file, tmp_path / "h", GramParams(max_length=16, max_gram_memory="1KB"))
    assert not (tmp_path / "h").exists()


def test_resume_after_an_interruption_gives_the_same_grams(experts, calib_file, tmp_path, monkeypatch):
    from mergeflow.grams import resume

    config = GramParams(max_length=16, batch_size=1, dtype="float64", checkpoint_every=2, max_gram_memory="11KB")  # float64: a pass per layer
    compute_grams(experts[0], calib_file, tmp_path / "whole", config)
    saves = []
    original = resume.GramResume.save

    def save_then_die(self, progress, sums):
        original(self, progress, sums)
        saves.append(progress)
        if len(saves) == 5:  # in the second layer group, after a checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(resume.GramResume, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        compute_grams(experts[0], calib_file, tmp_path / "g", config)
    assert not (tmp_path / "g").exists() and (tmp_path / ".g.partial" / "done" / "layer_000.safetensors").is_file()
    assert saves[-1].group == 1 and saves[-1].batch == 2
    monkeypatch.setattr(resume.GramResume, "save", original)
    compute_grams(experts[0], calib_file, tmp_path / "g", config)
    assert_same_grams(tmp_path / "g", tmp_path / "whole", exact=True)  # float64: identical
    assert not (tmp_path / ".g.partial").exists()


def test_a_checkpoint_of_another_command_is_discarded(experts, calib_file, tmp_path, caplog):
    stale = tmp_path / ".g.partial"
    stale.mkdir()
    (stale / "fingerprint").write_text("something else\n")
    (stale / "rank0.json").write_text("{}")
    (stale / "owner.json").write_text(json.dumps({"pid": os.getpid(), "start": 0, "boot": "an-earlier-boot", "host": socket.gethostname()}))
    with caplog.at_level("WARNING"):
        compute_grams(experts[0], calib_file, tmp_path / "g", GramParams(max_length=16, batch_size=3))
    assert "a checkpoint of a different command" in caplog.text and "ran under boot an-earlier-boot, this machine has booted since" in caplog.text
    assert GramDir.open(tmp_path / "g").num_tokens > 0 and not stale.exists()


def mergeflow_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "mergeflow", *map(str, args)]


def test_killed_cli_run_resumes_to_the_same_grams(experts, tmp_path):
    data = write_jsonl(tmp_path / "calib.jsonl", [{"text": t * (1 + i % 3)} for i, t in enumerate(TEXTS * 15)])
    args = ["grams", "--model", experts[0], "--data", data, "--max-length", 32, "--batch-size", 1, "--gram-dtype", "float64", "--checkpoint-every", 3]
    compute_grams(experts[0], data, tmp_path / "whole", GramParams(max_length=32, batch_size=1, dtype="float64"))
    proc = subprocess.Popen(mergeflow_cmd(*args, "--out", tmp_path / "g"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / ".g.partial" / "rank0.json"
    deadline = time.time() + 120
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; give it more rows"
    assert not (tmp_path / "g").exists()
    done = subprocess.run(mergeflow_cmd(*args, "--out", tmp_path / "g"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    assert_same_grams(tmp_path / "g", tmp_path / "whole", exact=True)


def test_torchrun_two_ranks_equal_one_process(experts, calib_file, tmp_path):
    args = ["grams", "--model", experts[0], "--data", calib_file, "--max-length", 16, "--batch-size", 2, "--gram-dtype", "float64"]
    compute_grams(experts[0], calib_file, tmp_path / "one", GramParams(max_length=16, batch_size=2, dtype="float64"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*torchrun, "-m", "mergeflow", *map(str, args), "--out", tmp_path / "two"], capture_output=True, text=True, env=env, timeout=300)
    first_failure = next((line for line in proc.stderr.splitlines() if "mergeflow: error" in line or ("[rank0]" in line and "Error" in line)), "")
    assert proc.returncode == 0, f"{first_failure}\n{proc.stderr[-3000:]}"  # a rank that fails first names itself
    assert_same_grams(tmp_path / "two", tmp_path / "one", exact=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no rank's checkpoint outlives the publish


def test_shards_summed_equal_the_whole(experts, calib_file, tmp_path):
    config = GramParams(max_length=16, batch_size=2, dtype="float64")
    whole = compute_grams(experts[0], calib_file, tmp_path / "whole", config)
    parts = [compute_grams(experts[0], calib_file, tmp_path / f"part{i}", config, shard=f"{i}/3") for i in range(3)]
    assert sum(parts) == whole and all(p > 0 for p in parts)
    assert json.loads((tmp_path / "part1" / "grams.json").read_text())["shard"] == "1/3"
    sum_grams([tmp_path / f"part{i}" for i in range(3)], tmp_path / "sum")
    assert_same_grams(tmp_path / "sum", tmp_path / "whole", exact=False)
    with pytest.raises(ValueError, match=r"--shard 3/3: need 0 <= i < n"):
        compute_grams(experts[0], calib_file, tmp_path / "bad", shard="3/3")


def reference_pickle(grams: Path, path: Path, *, drop: str | None = None, reshape: str | None = None) -> Path:
    """A gram.pkl in the RegMean reference's layout: module -> float32 mean, every module stored."""
    g = GramDir.open(grams)
    means = {m: g.load(m) / g.num_tokens for m in sorted(g.modules, key=lambda m: (m.split(".")[2], m))}
    means = {m: v.clone() for m, v in means.items() if m != drop}  # separate but identical tensors
    if reshape:
        means[reshape] = torch.zeros(3, 3)
    with open(path, "wb") as f:
        pickle.dump(means, f)
    return path


def test_import_round_trips_a_reference_pickle_and_merges_like_own_grams(experts, gram_dirs, tmp_path):
    from helpers import state

    from mergeflow.merge import merge_models
    from mergeflow.methods import get_method

    pkls = [reference_pickle(g, tmp_path / f"gram{i}.pkl") for i, g in enumerate(gram_dirs)]
    index = import_grams(pkls[0], experts[0], tmp_path / "imported0")
    import_grams(pkls[1], experts[1], tmp_path / "imported1")
    assert index["reduction"] == "mean" and index["num_tokens"] is None
    mods = index["modules"]
    assert mods["model.layers.1.self_attn.k_proj"] == mods["model.layers.1.self_attn.q_proj"] == mods["model.layers.1.self_attn.v_proj"]
    assert mods["model.layers.0.mlp.gate_proj"]["key"] == mods["model.layers.0.mlp.up_proj"]["key"] != mods["model.layers.0.mlp.down_proj"]["key"]
    own, imported = GramDir.open(gram_dirs[0]), GramDir.open(tmp_path / "imported0")
    for m in own.modules:
        torch.testing.assert_close(imported.load_mean(m), own.load_mean(m))
    assert GramDir.open(tmp_path / "imported0").verify()
    method = get_method("regmean")({"alpha": 0.5})
    merge_models(experts, method, tmp_path / "own", grams=gram_dirs)
    merge_models(experts, get_method("regmean")({"alpha": 0.5}), tmp_path / "imp", grams=[tmp_path / "imported0", tmp_path / "imported1"])
    a, b = state(tmp_path / "own"), state(tmp_path / "imp")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/mergeflow-test-pickle-ran-code")


def test_import_refuses_a_pickle_that_runs_code(experts, tmp_path):
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model.layers.0.self_attn.q_proj": Exploit()}))
    with pytest.raises(ValueError, match=r"evil\.pkl: refusing to load posix\.system"):
        import_grams(path, experts[0], tmp_path / "g")
    assert not MARKER.exists() and not (tmp_path / "g").exists()


def test_import_refuses_other_models_grams(experts, gram_dirs, tmp_path):
    pkl = reference_pickle(gram_dirs[0], tmp_path / "missing.pkl", drop="model.layers.1.mlp.down_proj")
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.1\.mlp\.down_proj'\]"):
        import_grams(pkl, experts[0], tmp_path / "g")
    pkl = reference_pickle(gram_dirs[0], tmp_path / "shape.pkl", reshape="model.layers.0.self_attn.o_proj")
    with pytest.raises(ValueError, match=r"gram of model\.layers\.0\.self_attn\.o_proj has shape \(3, 3\).*expected \(16, 16\)"):
        import_grams(pkl, experts[0], tmp_path / "g")
    assert not (tmp_path / "g").exists()


def test_sum_refuses_mean_grams(experts, gram_dirs, tmp_path):
    import_grams(reference_pickle(gram_dirs[0], tmp_path / "g.pkl"), experts[0], tmp_path / "means")
    with pytest.raises(ValueError, match=r"holds mean grams without token counts"):
        sum_grams([gram_dirs[0], tmp_path / "means"], tmp_path / "out")


def test_corruption_and_disagreeing_index_are_detected(experts, gram_dirs, tmp_path):
    bad = tmp_path / "g"
    shutil.copytree(gram_dirs[0], bad)
    data = bytearray((bad / "layer_001.safetensors").read_bytes())
    data[-5] ^= 0xFF  # same size, one flipped byte
    (bad / "layer_001.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"layer_001\.safetensors: SHA-256 differs .*recompute it: `rm -rf {bad} && mergeflow grams --model {experts[0]} --data \S+calib\.jsonl --out {bad} --max-length 16`$"):
        GramDir.open(bad).verify()
    from mergeflow.merge import merge_models
    from mergeflow.methods import get_method

    with pytest.raises(ValueError, match=r"layer_001\.safetensors: SHA-256 differs"):  # the merge checks before it writes
        merge_models(experts, get_method("regmean")(), tmp_path / "merged", grams=[bad, gram_dirs[1]])
    assert not (tmp_path / "merged").exists()
    (bad / "layer_001.safetensors").write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match=r"layer_001\.safetensors: \d+ bytes, but .*grams\.json records \d+; the file is truncated"):
        GramDir.open(bad)
    shutil.copy(gram_dirs[0] / "layer_001.safetensors", bad / "layer_001.safetensors")
    meta = json.loads((bad / "grams.json").read_text())
    meta["modules"]["model.layers.0.mlp.down_proj"]["key"] = "model.layers.0.mlp.nothing"
    (bad / "grams.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"layer_000\.safetensors: lacks tensors \['model\.layers\.0\.mlp\.nothing'\]"):
        GramDir.open(bad)


def test_cli_verify_and_sum(gram_dirs, tmp_path):
    import stat

    assert stat.S_IMODE((gram_dirs[0] / "layer_000.safetensors").stat().st_mode) == stat.S_IMODE((gram_dirs[0] / "grams.json").stat().st_mode)
    ok = subprocess.run(mergeflow_cmd("grams", "verify", *gram_dirs), capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.count(": ok (2 files)") == 2
    proc = subprocess.run(mergeflow_cmd("grams", "sum", gram_dirs[0], gram_dirs[0], "--out", tmp_path / "twice"), capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr == f"mergeflow: error: {gram_dirs[0]}: shard 0/1 again (also {gram_dirs[0]}); each slice may be added once\n"
    assert not (tmp_path / "twice").exists()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_calibration_formats_are_read_verbatim(fmt, tmp_path):
    from mergeflow.grams.data import load_rows

    frame = pd.DataFrame({"text": ["007", "1.50", "NA", "plain words"], "n": [1, 2, 3, 4]})
    path = tmp_path / f"d.{fmt}"
    {"csv": lambda: frame.to_csv(path, index=False), "parquet": lambda: frame.to_parquet(path), "jsonl": lambda: frame.to_json(path, orient="records", lines=True)}[fmt]()
    assert load_rows(path) == ["007", "1.50", "NA", "plain words"]
    assert load_rows(path, num_samples=2) == ["007", "1.50"]
    shuffled = load_rows(path, seed=3)
    assert sorted(shuffled) == sorted(["007", "1.50", "NA", "plain words"]) and load_rows(path, seed=3) == shuffled


def test_chat_messages_are_rendered_with_the_chat_template(experts, tmp_path):
    from transformers import AutoTokenizer

    from mergeflow.grams.data import tokenize

    model = tmp_path / "chat"
    shutil.copytree(experts[0], model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(model)
    messages = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}]
    sharegpt = [{"from": "human", "value": "1+2"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}, {"messages": sharegpt}])
    n = compute_grams(model, data, tmp_path / "g", GramParams(text_field="messages", max_length=64))
    rendered = ["user:1+2\nassistant:3\n", "user:1+2\n"]
    assert n == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in rendered)
    assert tokenize([messages], tok, 4) == [tok(rendered[0], add_special_tokens=False)["input_ids"][:4]]
    with pytest.raises(ValueError, match=r"chat messages but the tokenizer has no chat template"):
        compute_grams(experts[0], data, tmp_path / "h", GramParams(text_field="messages"))


def test_bad_inputs_are_clear_errors_and_leave_nothing(experts, calib_file, tmp_path):
    no_config = tmp_path / "noconfig"
    no_config.mkdir()
    with pytest.raises(FileNotFoundError, match=r"noconfig: no config\.json"):
        compute_grams(no_config, calib_file, tmp_path / "g")
    with pytest.raises(ValueError, match=r"max_length\n  Input should be greater than or equal to 1"):
        compute_grams(experts[0], calib_file, tmp_path / "g", GramParams(max_length=0))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv: is empty"):
        compute_grams(experts[0], tmp_path / "empty.csv", tmp_path / "g")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown calibration data format '\.txt'"):
        compute_grams(experts[0], tmp_path / "d.txt", tmp_path / "g")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.txt", "empty.csv", "noconfig"]
