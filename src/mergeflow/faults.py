"""Named fault points, so tests can interrupt a write at an exact instant instead of sleeping.

`fault_point("merge:shards-written")` does nothing unless the environment variable MERGEFLOW_FAULT
names that point: `MERGEFLOW_FAULT=<name>` raises KeyboardInterrupt there (what Ctrl-C does) and
`MERGEFLOW_FAULT=<name>:kill` sends SIGKILL to this very process (what the OOM killer does).
"""

from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    """Interrupt here if MERGEFLOW_FAULT names this point (a test hook; free when unset)."""
    fault = os.environ.get("MERGEFLOW_FAULT")
    if not fault:
        return
    if fault.removesuffix(":kill") != name:
        return
    if fault.endswith(":kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    raise KeyboardInterrupt(f"MERGEFLOW_FAULT={fault}")
