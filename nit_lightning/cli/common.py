"""What every suite command shares: one flag style, parse, run, and user errors as one line with exit code 2.

Flags are --kebab-case everywhere (`--num-samples`, `--ref-dir`); an old spelling (`--ref_dir`, `--num`) is refused with
the new one named, never guessed (no prefix abbreviations either). Set NIT_TRACEBACK=1 to see the traceback of a user
error. Lightning's own commands (fit/validate/test/predict) keep LightningCLI's dotted keys (`--trainer.max_steps`).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Any, Callable


# Errors a user can fix from the message alone (a missing file, a bad value, a full disk): no traceback for these.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError, KeyError)
# Flags renamed when the commands got one style; the underscore forms of every flag are caught without a list.
RENAMED = {"--num": "--num-samples", "--settings": "--sizes"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default: '(default: 16384)', '(default: off)' for a flag, '(required)'; a
    help that already says its default or that it is required (in words) is left as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or re.search("default|required", text, re.I):
            return text
        if action.required:
            return f"{text} (required)"
        if action.nargs == 0:  # store_true / store_false: the flag is off unless given
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def parser(prog: str, description: str, renamed: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser without prefix abbreviations (`--num` must not silently mean `--num-samples`) whose help
    shows every default; `renamed` maps this command's old flags to their new names (refused, naming the new one)."""
    p = argparse.ArgumentParser(prog=f"python -m nit_lightning {prog}", description=description, allow_abbrev=False,
                                formatter_class=HelpFormatter)
    p.renamed_flags = dict(renamed or {})  # read by _old_spelling
    return p


def dtype_name(allowed: tuple[str, ...]) -> Callable[[str], str]:
    """An argparse `type` for a dtype flag with `choices=allowed`: an old spelling (bf16, fp32) is refused naming the
    torch name to write, where argparse alone would only say "invalid choice"."""
    def dtype(value: str) -> str:
        from nit_lightning.records.names import check_dtype_name  # torch: only once a dtype flag is parsed

        try:
            return check_dtype_name(value, allowed, "")
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).strip()) from None

    return dtype


def add_threads(p: argparse.ArgumentParser) -> None:
    """--threads N: torch intra-op threads (what `make ... THREADS=N` passes on)."""
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own, one per core; 1 on a machine under load)")


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def subparser(subparsers: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A sub-command's parser in the same style (no abbreviations, defaults in the help)."""
    return subparsers.add_parser(name, help=help, description=help, allow_abbrev=False, formatter_class=HelpFormatter)


def _old_spelling(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    renamed = {**RENAMED, **getattr(parser, "renamed_flags", {})}
    known = {option for action in parser._actions for option in action.option_strings}
    for sub in (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)):
        known |= {o for p in sub.choices.values() for action in p._actions for o in action.option_strings}
    for token in argv:
        flag = token.split("=", 1)[0]
        if not flag.startswith("--") or flag in known:
            continue
        new = renamed.get(flag) or flag.replace("_", "-")
        if new in known:
            why = "one name per setting" if flag in renamed else "suite commands use --kebab-case flags"
            return f"{flag} is now spelled {new} ({why})"
    return None


def is_user_error(error: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool:
    """An error the message alone lets a user fix: USER_ERRORS, `extra`, or a class that says so (`user_error = True`:
    a folder held by another run, a pack that does not fit in memory)."""
    return isinstance(error, USER_ERRORS + extra) or bool(getattr(error, "user_error", False))


def user_error_line(prog: str, error: BaseException) -> str:
    """`<prog>: error: <message>` on one line (a KeyError's quotes dropped, line breaks folded)."""
    message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    message = " ".join(line.strip() for line in message.splitlines() if line.strip()) or type(error).__name__
    return f"{prog}: error: {message}"


def run_command(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None],
                argv: list[str]) -> int:
    """Parse argv (old spellings refused), run, and turn a user error into `<prog>: error: <message>`, exit 2."""
    old = _old_spelling(parser, argv)
    if old:
        parser.error(old)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(run(args) or 0)
    except Exception as error:
        if not is_user_error(error) or os.environ.get("NIT_TRACEBACK"):
            raise
        print(user_error_line(parser.prog, error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
