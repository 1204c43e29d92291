"""Bit-identical outputs on any x86-64 CPU and thread count: pin the CPU kernels before torch loads.

A float sum depends on the order of its terms. MKL's sgemm picks its kernel and blocking from the
CPU's instruction set and the thread count, and ATen's vectorised kernels (`_log_softmax`, `silu`,
`lerp_`, the CPU flash-attention backward) from the vector width, so the same seed gave other
weights on another CPU (issue 19). MKL's conditional numerical reproducibility mode and a fixed
ATen capability take both choices away from the machine; oneDNN is capped likewise in case a
kernel reaches it. MKL's strict mode covers BLAS, not LAPACK: a Cholesky or least-squares
factorisation still changes with the thread count, so those run on one thread (`lapack_one_thread`).
Every variable is read once, when its library initialises: they must be in the environment before
`import torch`. `benchmarks/determinism.py` measures what they cost and that they hold (README
"Reproducibility").

The promise is for CPU runs. CUDA kernels (bf16 above all) differ between GPU models, and nothing
here changes them.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

# AVX2 is the widest instruction set every x86-64 CPU of the last decade has (Haswell, Zen 1 and
# later); STRICT also takes the thread count out of MKL's results.
PINNED_ENV = {
    "MKL_CBWR": "AVX2,STRICT",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
OPT_OUT = "MERGEFLOW_BITWISE"  # MERGEFLOW_BITWISE=0: leave the kernels to the machine (faster, not reproducible)
_REEXEC = "_MERGEFLOW_PINNED_REEXEC"  # set on the one re-exec, so that it can never loop


def pinned() -> bool:
    """Whether this process's environment holds the pinned settings."""
    return all(os.environ.get(key) == value for key, value in PINNED_ENV.items())


def pin_cpu_kernels() -> None:
    """Put `PINNED_ENV` into the environment before torch loads; if torch is already loaded, start
    this process again (once) with it. Called first by every stage script and by the `mergeflow`
    command. With MERGEFLOW_BITWISE=0 it only warns."""
    if os.environ.get(OPT_OUT, "1") == "0":
        if not pinned():
            print(
                f"mergeflow: {OPT_OUT}=0: CPU kernels not pinned; outputs may differ from dvc.lock on another CPU or thread count",
                file=sys.stderr,
            )
        return
    if pinned():
        return
    os.environ.update(PINNED_ENV)
    if "torch" not in sys.modules:  # every library reads its variable when it initialises: in time
        return
    if os.environ.get(_REEXEC):
        raise RuntimeError("mergeflow: torch was imported before the CPU kernels could be pinned, even after a restart")
    os.environ[_REEXEC] = "1"
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


@contextmanager
def lapack_one_thread(device: str = "cpu") -> Iterator[None]:
    """Run a LAPACK factorisation (`cholesky_ex`, `lstsq`) on one thread when the kernels are pinned:
    MKL's potrf and gelsd split the work by thread count, whatever `MKL_CBWR` says (the toy zoo's
    256 x 256 down_proj gram already differs between 1 and 2 threads). Cost: one core's time, e.g.
    0.4 s of CPU for a 4096 x 4096 Cholesky, once per distinct gram."""
    import torch

    if device != "cpu" or not pinned():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
