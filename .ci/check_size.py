"""The developers' guide's size limits on src/: no function over 60 lines, no public function (or
method) with more than 8 keyword arguments (keyword-only or defaulted ones: the optional knobs a
caller names). Click commands are exempt from the second rule: click passes them every option.
Prints each offender; exits 1 when there is one.

    python .ci/check_size.py [src]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES = 60
MAX_KEYWORDS = 8


def keywords(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The keyword list: keyword-only arguments and positional ones with a default."""
    return len(node.args.kwonlyargs) + len(node.args.defaults)


def is_click_command(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated with `@<group>.command(...)`, `@click.command(...)` or `@<group>.group(...)`."""
    for d in node.decorator_list:
        func = d.func if isinstance(d, ast.Call) else d
        if isinstance(func, ast.Attribute) and func.attr in ("command", "group"):
            return True
    return False


def offenders(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_LINES:
                found.append(f"{path}:{node.lineno}: {node.name} is {lines} lines (at most {MAX_LINES})")
            if not node.name.startswith("_") and not is_click_command(node) and keywords(node) > MAX_KEYWORDS:
                found.append(f"{path}:{node.lineno}: {node.name} takes {keywords(node)} keyword arguments (at most {MAX_KEYWORDS})")
    return found


if __name__ == "__main__":
    problems = offenders(Path(sys.argv[1] if len(sys.argv) > 1 else "src"))
    print("\n".join(problems) or "ok")
    sys.exit(1 if problems else 0)
