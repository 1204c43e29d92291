"""Sharing grams and merged models through DVC remotes, for real, on loopback only (slow tests).

One committed pipeline run (conftest.py's `pipeline_run`, shared with test_pipeline.py) is cloned
into `origin`, which pushes everything to a local-directory remote (`shared`, the default) and the
stages that do not depend on the merge to a second one (`partial`). Every test then works in fresh
git clones of `origin` with their own empty DVC cache, and checks which stages ran, which were
skipped or pulled, and that the merged model is byte-identical to the one computed in the run.
Servers (moto's S3, an HTTP file server) are started on 127.0.0.1 and stopped by their fixtures.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import pickle
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, dvc_init_local, ran, run, skipped

# README, "Integrity": delete the corrupt object from DVC's cache, then fetch (or recompute) the grams.
RECOVERY = """
f=models/grams/math/layer_000.safetensors
find "$(dvc cache dir)" -samefile "$(readlink -f "$f")" -delete
rm -rf models/grams/math && dvc pull gram@math
"""
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class Origin:
    path: Path
    env: dict
    shared: Path  # local remote holding every output
    partial: Path  # local remote holding the outputs of `before` only
    graph: dict[str, set[str]]  # stage -> the stages that read its outputs
    after: set[str]  # merge and every stage downstream of it
    before: set[str]  # every other stage (download-*, download@*, gram@*, the reference evaluations)


def stage_graph(repo: Path, env: dict) -> dict[str, set[str]]:
    """The pipeline's DAG from `dvc dag --dot`: stage -> the stages that depend on it."""
    dot = run(["dvc", "dag", "--dot"], repo, env)
    graph: dict[str, set[str]] = {name: set() for name in re.findall(r'^"([^"]+)";$', dot, re.MULTILINE)}
    for src, dst in re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.MULTILINE):
        graph[src].add(dst)
    return graph


def downstream(graph: dict[str, set[str]], stage: str) -> set[str]:
    seen, todo = set(), [stage]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def pulled(output: str) -> set[str]:
    """Stages that `dvc repro --pull` restored from the remote instead of running them."""
    return set(re.findall(r"Pulling data for stage: '([^']+)'", output))


def digests(root: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file under `root` (or of `root` itself)."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def lock_outs(repo: Path, stage: str) -> list:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]["outs"]


@pytest.fixture(scope="module")
def origin(pipeline_run, tmp_path_factory) -> Origin:
    """A clone of the pipeline run that has pushed its outputs (reading them from the run's cache)."""
    src, env, _ = pipeline_run
    dest = tmp_path_factory.mktemp("origin")
    run(["git", "clone", "-q", str(src), str(dest)], dest.parent, env)
    dvc_init_local(dest, env, tmp_path_factory.mktemp("origin-site-cache"))
    run(["dvc", "cache", "dir", "--local", str(src / ".dvc" / "cache")], dest, env)
    run(["dvc", "checkout"], dest, env)
    shared, partial = tmp_path_factory.mktemp("remote-shared"), tmp_path_factory.mktemp("remote-partial")
    run(["dvc", "remote", "add", "-d", "shared", str(shared)], dest, env)
    run(["dvc", "remote", "add", "partial", str(partial)], dest, env)
    run(["git", "commit", "-qam", "remotes"], dest, env)  # clones get the remotes
    run(["dvc", "push"], dest, env)
    graph = stage_graph(dest, env)
    after = {"merge"} | downstream(graph, "merge")
    before = set(graph) - after
    assert {"download-base", "download@math", "download@code", "download-eval", "gram@math", "gram@code"} <= before and {"merge", "evaluate", "submit"} <= after
    run(["dvc", "push", "-r", "partial", *sorted(before)], dest, env)
    return Origin(dest, env, shared, partial, graph, after, before)


def clone(origin: Origin, tmp_path: Path, name: str = "clone") -> Path:
    """A fresh git clone of `origin`: no DVC data, an empty cache of its own."""
    dest = tmp_path / name
    run(["git", "clone", "-q", str(origin.path), str(dest)], tmp_path, origin.env)
    dvc_init_local(dest, origin.env, tmp_path / f"{name}-site-cache")
    return dest


def test_merge_depends_on_the_grams_of_every_expert():
    """`dvc repro --pull` and `dvc exp run --pull` fetch a missing dependency only when it is a
    stage's output, so merge lists each expert's gram directory, never the folder models/grams."""
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["merge"]["deps"]
    experts = yaml.safe_load((ROOT / "params.yaml").read_text())["experts"]
    assert sorted(d for d in deps if d.startswith("models/grams")) == sorted(f"models/grams/{e}" for e in experts)


@pytest.mark.slow
def test_pull_grams_then_repro_pull_recomputes_only_what_the_remote_lacks(origin, tmp_path):
    """A fresh clone pulls the grams (`dvc pull gram@math gram@code`), then `dvc repro --pull`
    against `partial`, which lacks the merged model and the submission: the rest of the inputs
    are pulled, never recomputed; merge and what follows run and give the same merged model."""
    dest, env = clone(origin, tmp_path), origin.env
    run(["dvc", "remote", "default", "--local", "partial"], dest, env)
    run(["dvc", "pull", "gram@math", "gram@code"], dest, env)
    assert digests(dest / "models/grams") == digests(origin.path / "models/grams")
    assert not (dest / "models/experts").exists() and not (dest / "models/merged").exists()
    out = run(["dvc", "repro", "--pull"], dest, env)
    assert {"download-base", "download@math", "download@code", "download-eval"} <= pulled(out) and {"gram@math", "gram@code"} <= skipped(out)
    assert ran(out) & origin.before == set()
    assert {"merge", "submit"} <= ran(out) <= origin.after
    assert digests(dest / "models/merged") == digests(origin.path / "models/merged")
    assert digests(dest / "submission.csv") == digests(origin.path / "submission.csv")
    assert lock_outs(dest, "merge") == lock_outs(origin.path, "merge")
    assert "Data and pipelines are up to date." in run(["dvc", "status"], dest, env)


@pytest.mark.slow
def test_repro_pull_allow_missing_runs_and_fetches_nothing_unchanged(origin, tmp_path):
    dest, env = clone(origin, tmp_path), origin.env
    out = run(["dvc", "repro", "--pull", "--allow-missing"], dest, env)
    assert ran(out) == set() and skipped(out) == set(origin.graph)
    cached = [p for p in (dest / ".dvc" / "cache").rglob("*") if p.is_file()] if (dest / ".dvc" / "cache").exists() else []
    assert cached == [] and not (dest / "models/grams/math").exists()


@pytest.mark.slow
def test_alpha_experiment_on_fresh_clone_pulls_only_what_merge_needs(origin, tmp_path):
    """`dvc exp run -S alpha=0.3 --pull --allow-missing`: the grams and experts come from the
    remote, only merge and what follows run."""
    dest, env = clone(origin, tmp_path), origin.env
    out = run(["dvc", "exp", "run", "-S", "alpha=0.3", "--pull", "--allow-missing"], dest, env)
    assert {"merge", "evaluate", "submit"} <= ran(out) <= origin.after
    assert skipped(out) >= origin.before
    assert json.loads((dest / "models/merged/mergeflow_merge.json").read_text())["alpha"] == 0.3
    assert digests(dest / "models/grams") == digests(origin.path / "models/grams")
    assert digests(dest / "models/experts") == digests(origin.path / "models/experts")
    # merge's inputs since regmean_pp forwards them (small text files), fetched as its other inputs
    assert digests(dest / "data/calib") == digests(origin.path / "data/calib")


# --- S3 (moto in server mode on loopback) ---------------------------------------------------------


@pytest.fixture
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.mark.slow
def test_s3_remote_push_and_pull(origin, s3_endpoint, tmp_path):
    import boto3

    env = {**origin.env, **DUMMY_AWS}  # credentials from the environment, never in a config file
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    s3.create_bucket(Bucket="mergeflow-test")
    dest = clone(origin, tmp_path)
    for repo in (origin.path, dest):
        run(["dvc", "remote", "add", "--local", "s3", "s3://mergeflow-test/dvc"], repo, env)
        run(["dvc", "remote", "modify", "--local", "s3", "endpointurl", s3_endpoint], repo, env)
    run(["dvc", "push", "-r", "s3"], origin.path, env)
    keys = {o["Key"].removeprefix("dvc/") for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mergeflow-test") for o in page.get("Contents", [])}
    assert keys == {str(p.relative_to(origin.shared)) for p in origin.shared.rglob("*") if p.is_file()}
    assert "in sync" in run(["dvc", "status", "--cloud", "-r", "s3"], origin.path, env)

    run(["dvc", "pull", "-r", "s3"], dest, env)
    assert "Data and pipelines are up to date." in run(["dvc", "status"], dest, env)  # `dvc repro` would run nothing
    for path in ("models/grams", "models/merged", "submission.csv"):
        assert digests(dest / path) == digests(origin.path / path), path


# --- published grams over HTTP: dvc import-url, mergeflow grams import, dvc update ----------------


@pytest.fixture
def http_root(tmp_path):
    """A folder served over HTTP on 127.0.0.1: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def published_grams(model: Path, seed: int) -> dict[str, torch.Tensor]:
    """Grams in the RegMean reference's `gram.pkl` layout: module -> float32 [in, in] per-token mean,
    q/k/v and gate/up stored separately but equal, lm_head included."""
    from safetensors import safe_open

    generator = torch.Generator().manual_seed(seed)
    shared: dict[str, torch.Tensor] = {}
    grams = {}
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        for key in sorted(f.keys()):
            if not (key.endswith("_proj.weight") or key == "lm_head.weight"):
                continue
            module = key.removesuffix(".weight")
            source = re.sub(r"(k|v)_proj$", "q_proj", re.sub(r"up_proj$", "gate_proj", module))
            if source not in shared:
                n = f.get_slice(key).get_shape()[1]
                a = torch.randn(n, n, generator=generator)
                shared[source] = a @ a.T / n
            grams[module] = shared[source].clone()
    return grams


def serve(root: Path, grams: dict[str, torch.Tensor], mtime: float) -> bytes:
    import os

    with open(root / "gram.pkl", "wb") as f:
        pickle.dump(grams, f)
    os.utime(root / "gram.pkl", (mtime, mtime))  # a new Last-Modified, as a real server would send
    return (root / "gram.pkl").read_bytes()


@pytest.mark.slow
def test_import_url_then_convert_then_update(origin, http_root, tmp_path):
    from mergeflow.grams import GramDir

    root, url = http_root
    dest, env = clone(origin, tmp_path), origin.env
    first = published_grams(origin.path / "models/experts/math", seed=1)
    served = serve(root, first, 1_700_000_000)
    (dest / "data/published").mkdir(parents=True)
    run(["dvc", "import-url", f"{url}/gram.pkl", "data/published/gram.pkl"], dest, env)
    record = yaml.safe_load((dest / "data/published/gram.pkl.dvc").read_text())
    assert record["deps"][0]["path"] == f"{url}/gram.pkl"
    assert record["outs"][0]["md5"] == hashlib.md5(served).hexdigest()
    assert (dest / "data/published/gram.pkl").read_bytes() == served

    convert = "mergeflow grams import data/published/gram.pkl --model models/experts/math --out models/grams/math-published"
    run(["dvc", "stage", "add", "-n", "import-grams-math", "-d", "data/published/gram.pkl", "-d", "models/experts/math",
         "-o", "models/grams/math-published", convert], dest, env)
    out = run(["dvc", "repro", "--pull", "--allow-missing", "import-grams-math"], dest, env)
    assert ran(out) == {"import-grams-math"}
    grams = GramDir.open(dest / "models/grams/math-published")
    assert grams.reduction == "mean" and set(grams.modules) == set(first)
    assert torch.equal(grams.load("model.layers.0.self_attn.v_proj"), first["model.layers.0.self_attn.q_proj"])
    assert torch.equal(grams.load("lm_head"), first["lm_head"])

    second = published_grams(origin.path / "models/experts/math", seed=2)
    served = serve(root, second, 1_700_000_600)
    run(["dvc", "update", "data/published/gram.pkl.dvc"], dest, env)
    assert (dest / "data/published/gram.pkl").read_bytes() == served
    assert yaml.safe_load((dest / "data/published/gram.pkl.dvc").read_text())["outs"][0]["md5"] == hashlib.md5(served).hexdigest()
    out = run(["dvc", "repro", "--allow-missing", "import-grams-math"], dest, env)
    assert ran(out) == {"import-grams-math"}
    grams = GramDir.open(dest / "models/grams/math-published")
    assert torch.equal(grams.load("model.layers.0.mlp.up_proj"), second["model.layers.0.mlp.gate_proj"])


# --- integrity: a gram file corrupted on the remote ------------------------------------------------


@pytest.fixture
def bad_remote(origin, tmp_path) -> tuple[Path, str]:
    """A copy of `shared` whose object for models/grams/math/layer_000.safetensors has one
    mantissa bit flipped (still a valid, finite safetensors file): (remote, the file's md5)."""
    bad = tmp_path / "remote-bad"
    shutil.copytree(origin.shared, bad)
    (out,) = lock_outs(origin.path, "gram@math")
    manifest = json.loads((bad / "files/md5" / out["md5"][:2] / out["md5"][2:]).read_text())
    (md5,) = [e["md5"] for e in manifest if e["relpath"] == "layer_000.safetensors"]
    obj = bad / "files/md5" / md5[:2] / md5[2:]
    data = bytearray(obj.read_bytes())
    data[8 + int.from_bytes(data[:8], "little")] ^= 1  # lowest byte of the first float32
    obj.chmod(0o644)
    obj.write_bytes(bytes(data))
    return bad, md5


@pytest.mark.slow
def test_corrupt_remote_file_is_refused_by_a_verifying_remote(origin, bad_remote, tmp_path):
    """`verify = true` on a remote: DVC rehashes what it downloads and refuses the corrupt file."""
    bad, _ = bad_remote
    dest, env = clone(origin, tmp_path), origin.env
    run(["dvc", "remote", "add", "--local", "bad", str(bad)], dest, env)
    run(["dvc", "remote", "modify", "--local", "bad", "verify", "true"], dest, env)
    out = run(["dvc", "pull", "-r", "bad", "gram@math"], dest, env, ok=False)
    assert "models/grams/math" in out
    assert not (dest / "models/grams/math/layer_000.safetensors").exists()
    run(["dvc", "pull", "gram@math"], dest, env)  # recovery: a good remote
    assert digests(dest / "models/grams/math") == digests(origin.path / "models/grams/math")


@pytest.mark.slow
def test_corrupt_file_dvc_accepts_is_caught_by_mergeflow(origin, bad_remote, tmp_path):
    """Without `verify`, DVC trusts the download (and its cache: `dvc status` sees nothing);
    mergeflow's SHA-256 in grams.json names the file, and the README's recovery restores it."""
    bad, md5 = bad_remote
    dest, env = clone(origin, tmp_path), origin.env
    run(["dvc", "remote", "add", "--local", "bad", str(bad)], dest, env)
    run(["dvc", "pull", "-r", "bad", "gram@math"], dest, env)
    layer = dest / "models/grams/math/layer_000.safetensors"
    assert hashlib.md5(layer.read_bytes()).hexdigest() != md5
    assert "models/grams/math" not in run(["dvc", "status", "gram@math"], dest, env)

    out = run(["mergeflow", "grams", "verify", "models/grams/math"], dest, env, ok=False)
    assert "models/grams/math/layer_000.safetensors" in out and "SHA-256" in out
    # The README's recovery: `dvc pull --force` and `dvc checkout --relink` would link the same
    # corrupt cache object again, so it is deleted from the cache first.
    recovery = subprocess.run(["bash", "-ec", RECOVERY], cwd=dest, env=env, capture_output=True, text=True, check=False)
    assert recovery.returncode == 0, recovery.stderr
    assert "ok" in run(["mergeflow", "grams", "verify", "models/grams/math"], dest, env)
    assert digests(dest / "models/grams/math") == digests(origin.path / "models/grams/math")


def readme_remote_repair(remote: Path, name: str) -> str:
    """README, "Integrity": the commands that repair a corrupt object on a remote, as written
    there, with its first line (which file, which remote) set to ours."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("d=models/grams/math; f=layer_007.safetensors; remote=")
    lines = readme[start:readme.index("```", start)].splitlines()
    return "\n".join([f"d=models/grams/math; f={name}; remote={remote}", *lines[1:]]) + "\n"


@pytest.mark.slow
def test_corrupt_object_on_a_remote_is_repaired_as_the_readme_says(origin, bad_remote, tmp_path):
    """`dvc push` skips a directory whose `.dir` manifest the remote has, even with an object of
    it deleted; the README's repair deletes both and pushes the good copy, which then passes a
    verifying pull."""
    bad, md5 = bad_remote
    dest, env = clone(origin, tmp_path), origin.env
    run(["dvc", "pull", "gram@math"], dest, env)  # a good copy (from `shared`)
    run(["dvc", "remote", "add", "--local", "-d", "bad", str(bad)], dest, env)
    obj = bad / "files/md5" / md5[:2] / md5[2:]
    corrupt = obj.read_bytes()
    obj.unlink()
    assert "Everything is up to date." in run(["dvc", "push", "models/grams/math"], dest, env)
    assert not obj.exists()  # why the manifest must go too
    obj.write_bytes(corrupt)

    repair = subprocess.run(["bash", "-ec", readme_remote_repair(bad, "layer_000.safetensors")], cwd=dest, env=env, capture_output=True, text=True, check=False)
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert "2 files pushed" in repair.stdout + repair.stderr
    assert hashlib.md5(obj.read_bytes()).hexdigest() == md5

    check = clone(origin, tmp_path, "check")
    run(["dvc", "remote", "add", "--local", "bad", str(bad)], check, env)
    run(["dvc", "remote", "modify", "--local", "bad", "verify", "true"], check, env)
    run(["dvc", "pull", "-r", "bad", "gram@math"], check, env)
    assert digests(check / "models/grams/math") == digests(origin.path / "models/grams/math")
