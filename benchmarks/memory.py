"""Run a command and poll the peak memory of its whole process tree.

Peak anonymous memory (the sum of `RssAnon` over the tree) is what a merge really needs: pages of
memory-mapped inputs count in RSS too, but the kernel can drop them at will. Peak total RSS is
reported beside it.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

import psutil


@dataclass
class Measurement:
    seconds: float
    peak_anon_bytes: int
    peak_rss_bytes: int
    returncode: int


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def measure(cmd: list[str], interval: float = 0.02, **popen_kwargs) -> Measurement:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, **popen_kwargs)
    root = psutil.Process(proc.pid)
    peak_anon = peak_rss = 0
    while proc.poll() is None:
        try:
            pids = [proc.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        peak_anon = max(peak_anon, sum(_status_kib(p, "RssAnon") for p in pids) * 1024)
        peak_rss = max(peak_rss, sum(_status_kib(p, "VmRSS") for p in pids) * 1024)
        time.sleep(interval)
    proc.wait()
    return Measurement(time.perf_counter() - start, peak_anon, peak_rss, proc.returncode)
