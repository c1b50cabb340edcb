"""What every suite command shares: parse, run, and turn user errors into one line and exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

# Errors a user can fix from the message alone (a missing file, a bad value): no traceback for these.
USER_ERRORS = (FileNotFoundError, ValueError, KeyError)


def run_command(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int],
                argv: list[str]) -> int:
    """parse_args(argv) then run(args); a user error prints `<prog>: error: <message>` and returns 2."""
    args = parser.parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
