"""What every DVC stage script shares: logging, params, and one clear line for expected errors."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .logs import setup_logging
from .params import Params, load_params


def run_stage(description: str, add_arguments: Callable[[argparse.ArgumentParser], None], body: Callable[[argparse.Namespace, Params], None], params: Sequence[str] = ()) -> None:
    """Parse the arguments, load the params file and run `body`; expected errors become one line.

    `params`: the keys the stage reads, as its `dvc.yaml` entry lists them; each must be in the
    file (a group: every key of it), so a stage never runs on a default the file does not show.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="parameters file [default: params.yaml]")
    add_arguments(parser)
    args = parser.parse_args()
    setup_logging()
    try:
        body(args, load_params(args.params, require=params))
    except (ValueError, OSError, KeyError) as err:  # OSError: missing files, hub errors
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        sys.exit(1)
