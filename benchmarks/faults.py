"""The fault suite of issue 14 ("lose nothing, ever"): run every test marked `faults` and tabulate
what each fault did.

    python benchmarks/faults.py                    # all fault tests (tests/, marker `faults`)
    python benchmarks/faults.py --json results.json -- -k merge   # extra pytest arguments after --

Each fault test records, through pytest's `record_property`, `fault` (what was done), `outcome`
(`refused: ...`, `warned: ...`, `recovered: ...`) and `bytes_lost` (bytes of an earlier good output
that were gone or changed afterwards). This runs `pytest -m faults --junitxml`, reads those
properties back and prints a Markdown table and one summary line, which goes into the README's
"Reliability" section. Exit status: pytest's (non-zero when any fault test failed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_suite(junit: Path, extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", "-m", "faults", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "-o", "junit_family=xunit1", *extra]
    return subprocess.run(cmd, cwd=ROOT).returncode


def read_results(junit: Path) -> list[dict]:
    """One row per test case: its properties, and whether it passed."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        status = "failed" if case.find("failure") is not None or case.find("error") is not None else (
            "skipped" if case.find("skipped") is not None else "passed")
        rows.append({
            "test": f"{case.get('classname', '')}::{case.get('name', '')}",
            "fault": props.get("fault", case.get("name", "")),
            "outcome": props.get("outcome", "-"),
            "bytes_lost": int(props["bytes_lost"]) if props.get("bytes_lost", "").lstrip("-").isdigit() else None,
            "status": status,
        })
    return rows


def kind(outcome: str) -> str:
    """`refused`, `warned`, `recovered`... : the outcome's first word."""
    return outcome.replace(",", ":").split(":")[0].strip().split(" ")[0] or "-"


def summary(rows: list[dict]) -> str:
    kinds = Counter(kind(r["outcome"]) for r in rows if r["status"] == "passed")
    failed = sum(r["status"] == "failed" for r in rows)
    lost = sum(r["bytes_lost"] or 0 for r in rows)
    unmeasured = sum(r["bytes_lost"] is None for r in rows)
    parts = [f"{len(rows)} faults", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))]
    parts.append(f"{lost} bytes lost" + (f" ({unmeasured} without a measure)" if unmeasured else ""))
    parts.append(f"{failed} failed" if failed else "all passed")
    return "; ".join(p for p in parts if p)


def table(rows: list[dict]) -> str:
    lines = ["| fault | outcome | bytes lost | status |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["status"] != "failed", r["test"])):
        lost = "-" if r["bytes_lost"] is None else str(r["bytes_lost"])
        outcome = r["outcome"] if r["status"] == "passed" else f"**{r['status'].upper()}** ({r['outcome']})"
        lines.append(f"| {r['fault']} | {outcome} | {lost} | {r['status']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows and the summary as JSON here")
    parser.add_argument("--junit", type=Path, help="keep pytest's JUnit XML here [default: a temporary file]")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        junit = args.junit or Path(tmp) / "faults.xml"
        code = run_suite(junit, args.pytest_args)
        if not junit.is_file():
            print(f"faults: pytest wrote no {junit} (exit status {code})", file=sys.stderr)
            return code or 1
        rows = read_results(junit)
    print()
    print(table(rows))
    print()
    line = summary(rows)
    print(line)
    if args.json:
        args.json.write_text(json.dumps({"summary": line, "rows": rows}, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
