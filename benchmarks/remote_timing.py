"""What sharing grams through a DVC remote costs, next to computing or writing them.

    python benchmarks/remote_timing.py grams [--gib 2] [--cache-type hardlink,symlink ...]
    python benchmarks/remote_timing.py toy

`grams`: a synthetic gram directory of about `--gib` GiB in mergeflow's format (random float32
tensors with the shapes of a 2048-hidden, 5632-intermediate, 12-layer Llama: one 177 MB file per
layer) is written into a new git+DVC repository; then `dvc add` (DVC's md5 hashing and the commit
into its cache), `dvc push` to a local-directory remote, `dvc pull` into a fresh clone with an
empty cache (plain, and with the remote's `verify = true`, which rehashes what it downloads),
a partial pull of one layer file, and `mergeflow grams verify` (SHA-256 of every file), once per
cache link type. Everything is on one disk with a warm page cache, so the figures are those of
the local file system, not of a network.

`toy`: on the default toy zoo, a from-scratch `dvc repro --force` in a fresh clone of the committed
repository, against a fresh clone that `dvc pull`s what it pushed and runs `dvc repro` (nothing to
recompute), and one that pulls only the download stages and the grams and recomputes merge and what follows.

Prints Markdown tables and writes benchmarks/results/remote-<mode>.json; the figures measured on
the reference machine are in benchmarks/README.md. Temporary files go to $TMPDIR and are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GIT_ID = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}


def environment() -> dict[str, str]:
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return {**os.environ, **offline, **GIT_ID, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    os.sync()  # earlier writes are not charged to this command
    start = time.perf_counter()
    out = sh(cmd, cwd, env)
    os.sync()
    return time.perf_counter() - start, out


def du(path: Path) -> int:
    """Bytes on disk under `path`, each hard-linked file counted once."""
    seen, total = set(), 0
    for p in [path, *path.rglob("*")]:
        st = p.lstat()
        if p.is_file() and not p.is_symlink() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def new_dvc_repo(path: Path, env: dict, tmp: Path) -> None:
    path.mkdir(parents=True)
    sh(["git", "init", "-q"], path, env)
    sh(["dvc", "init", "-q"], path, env)
    sh(["dvc", "config", "--local", "core.site_cache_dir", str(tmp / f"site-{path.name}")], path, env)
    sh(["dvc", "config", "--local", "core.analytics", "false"], path, env)


def fresh_clone(src: Path, dest: Path, env: dict, tmp: Path) -> None:
    sh(["git", "clone", "-q", str(src), str(dest)], dest.parent, env)
    sh(["dvc", "config", "--local", "core.site_cache_dir", str(tmp / f"site-{dest.name}")], dest, env)
    sh(["dvc", "config", "--local", "core.analytics", "false"], dest, env)


def write_synthetic_grams(out: Path, gib: float) -> tuple[float, int]:
    """Random grams with the shapes of a 2048/5632 Llama, as many layers as make about `gib` GiB."""
    import torch

    from mergeflow.grams.format import GramRef, GramWriter, by_file, file_for
    from mergeflow.atomic import atomic_dir

    hidden, intermediate = 2048, 5632
    per_layer = 4 * (3 * hidden * hidden + intermediate * intermediate)
    layers = max(1, round(gib * 2**30 / per_layer))
    torch.manual_seed(0)
    sums, keys = {}, {}
    for i in range(layers):
        p = f"model.layers.{i}"
        for name, n in (("self_attn.q_proj", hidden), ("self_attn.o_proj", hidden), ("mlp.gate_proj", hidden), ("mlp.down_proj", intermediate)):
            sums[f"{p}.{name}"] = torch.randn(n, n)
        keys.update({f"{p}.self_attn.{m}_proj": f"{p}.self_attn.q_proj" for m in "qkv"})
        keys.update({f"{p}.mlp.{m}_proj": f"{p}.mlp.gate_proj" for m in ("gate", "up")})
        keys.update({f"{p}.self_attn.o_proj": f"{p}.self_attn.o_proj", f"{p}.mlp.down_proj": f"{p}.mlp.down_proj"})
    os.sync()
    start = time.perf_counter()
    with atomic_dir(out) as tmp:  # the writer `mergeflow grams import` uses: file by file, then grams.json
        writer = GramWriter(tmp)
        for file, members in sorted(by_file(sums, file_for).items()):
            writer.write_file(file, {key: sums[key] for key in members})
        writer.finish({m: GramRef(file_for(k), k) for m, k in keys.items()}, num_tokens=1000, model="synthetic")
    os.sync()
    return time.perf_counter() - start, layers


def bench_grams(gib: float, cache_types: list[str]) -> dict:
    env = environment()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mergeflow-remote-bench-") as t:
        tmp = Path(t)
        for n, cache_type in enumerate(cache_types):
            repo = tmp / f"repo{n}"
            new_dvc_repo(repo, env, tmp)
            sh(["dvc", "config", "cache.type", cache_type], repo, env)
            write_s, layers = write_synthetic_grams(repo / "grams", gib)
            size = sum(p.stat().st_size for p in (repo / "grams").iterdir())
            add_s, _ = timed(["dvc", "add", "grams"], repo, env)
            layer = repo / "grams" / "layer_000.safetensors"
            linked = layer.stat().st_nlink > 1 or layer.is_symlink()
            disk_after_add = du(repo)
            remote = tmp / f"remote{n}"
            sh(["dvc", "remote", "add", "-d", "local", str(remote)], repo, env)
            sh(["git", "add", "-A"], repo, env)
            sh(["git", "commit", "-qm", "grams"], repo, env)
            push_s, _ = timed(["dvc", "push"], repo, env)
            clone = tmp / f"clone{n}"
            fresh_clone(repo, clone, env, tmp)
            pull_s, _ = timed(["dvc", "pull"], clone, env)
            verify_dvc = tmp / f"clone{n}-verify"
            fresh_clone(repo, verify_dvc, env, tmp)
            sh(["dvc", "remote", "modify", "--local", "local", "verify", "true"], verify_dvc, env)
            pull_verify_s, _ = timed(["dvc", "pull"], verify_dvc, env)
            partial = tmp / f"clone{n}-partial"
            fresh_clone(repo, partial, env, tmp)
            partial_s, _ = timed(["dvc", "pull", "grams/layer_000.safetensors"], partial, env)
            partial_files = sorted(p.name for p in (partial / "grams").iterdir())
            sha_s, _ = timed(["mergeflow", "grams", "verify", "grams"], clone, env)
            rows.append({
                "cache_type": cache_type, "bytes": size, "files": layers + 1, "write_s": write_s, "dvc_add_s": add_s,
                "workspace_linked_after_add": linked, "disk_after_add_bytes": disk_after_add, "push_s": push_s,
                "pull_s": pull_s, "pull_verify_s": pull_verify_s, "pull_one_layer_s": partial_s, "pull_one_layer_files": partial_files,
                "sha256_verify_s": sha_s,
            })
            for path in (repo, remote, clone, verify_dvc, partial):
                shutil.rmtree(path, ignore_errors=True)
    return {"gib": gib, "cpus": os.cpu_count(), "rows": rows}


def print_grams(result: dict) -> None:
    print("| cache.type | GiB | files | write (+SHA-256) | `dvc add` | disk after add | `dvc push` | `dvc pull` | pull, verify=true | pull 1 layer | `mergeflow grams verify` |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        gib = r["bytes"] / 2**30
        print(f"| `{r['cache_type']}` | {gib:.2f} | {r['files']} | {r['write_s']:.1f} s | {r['dvc_add_s']:.1f} s | {r['disk_after_add_bytes'] / 2**30:.2f} GiB "
              f"| {r['push_s']:.1f} s | {r['pull_s']:.1f} s | {r['pull_verify_s']:.1f} s | {r['pull_one_layer_s']:.1f} s | {r['sha256_verify_s']:.1f} s |")


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def bench_toy() -> dict:
    env = environment()
    with tempfile.TemporaryDirectory(prefix="mergeflow-remote-bench-") as t:
        tmp = Path(t)
        origin = tmp / "origin"
        fresh_clone(ROOT, origin, env, tmp)
        scratch_s, out = timed(["dvc", "repro", "--force"], origin, env)
        scratch_ran = ran(out)
        sh(["dvc", "remote", "add", "-d", "local", str(tmp / "remote")], origin, env)
        sh(["git", "add", "-A"], origin, env)
        sh(["git", "commit", "-qm", "repro"], origin, env)
        push_s, _ = timed(["dvc", "push"], origin, env)
        full = tmp / "clone-full"
        fresh_clone(origin, full, env, tmp)
        pull_s, _ = timed(["dvc", "pull"], full, env)
        repro_s, out = timed(["dvc", "repro"], full, env)
        full_ran = ran(out)
        grams = tmp / "clone-grams"
        fresh_clone(origin, grams, env, tmp)
        pull_grams_s, _ = timed(["dvc", "pull", "download-base", "download", "download-eval", "gram@math", "gram@code"], grams, env)
        repro_grams_s, out = timed(["dvc", "repro"], grams, env)
        grams_ran = ran(out)
    return {
        "scratch_repro_force_s": scratch_s, "scratch_ran": scratch_ran, "push_s": push_s,
        "clone_pull_s": pull_s, "clone_repro_s": repro_s, "clone_ran": full_ran,
        "clone_pull_grams_s": pull_grams_s, "clone_repro_after_grams_s": repro_grams_s, "clone_after_grams_ran": grams_ran,
    }


def print_toy(r: dict) -> None:
    print("| fresh clone of the committed repository | seconds | stages run |\n|---|---|---|")
    print(f"| from scratch: `dvc repro --force` | {r['scratch_repro_force_s']:.1f} | {len(r['scratch_ran'])} |")
    print(f"| `dvc pull` (everything) + `dvc repro` | {r['clone_pull_s']:.1f} + {r['clone_repro_s']:.1f} = {r['clone_pull_s'] + r['clone_repro_s']:.1f} | {len(r['clone_ran'])} |")
    print(f"| `dvc pull download-base download download-eval gram@math gram@code` + `dvc repro` | {r['clone_pull_grams_s']:.1f} + {r['clone_repro_after_grams_s']:.1f} = "
          f"{r['clone_pull_grams_s'] + r['clone_repro_after_grams_s']:.1f} | {len(r['clone_after_grams_ran'])}: {', '.join(r['clone_after_grams_ran'])} |")
    print(f"| (`dvc push` of the whole run to a local remote) | {r['push_s']:.1f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    g = sub.add_parser("grams", help="a synthetic gram directory through dvc add / push / pull")
    g.add_argument("--gib", type=float, default=2.0, help="size of the gram directory")
    g.add_argument("--cache-type", action="append", help="DVC cache.type values to compare [default: hardlink,symlink and reflink,hardlink,symlink]")
    sub.add_parser("toy", help="fresh-clone pull + repro against a from-scratch repro on the default toy zoo")
    args = parser.parse_args()
    if args.mode == "grams":
        result = bench_grams(args.gib, args.cache_type or ["hardlink,symlink", "reflink,hardlink,symlink"])
        print_grams(result)
    else:
        result = bench_toy()
        print_toy(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"remote-{args.mode}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
