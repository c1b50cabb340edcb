"""Config mistakes of fit/validate/test/predict as one line that says what to do.

LightningCLI's parser (jsonargparse, argparse underneath) would take `--trainer.max_step 10` as `max_steps` (a prefix
match) and answer `--model.lrr 1e-3` with 84 lines of usage. Here: no abbreviations anywhere, an unknown key gets the
nearest valid one, a missing `--config` and a GPU config on a CPU machine name the fix. Everything else keeps
jsonargparse's message, joined into one line (exit code 2 as before).
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Any, Iterable, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

PROG = "python -m nit_lightning"
CONFIG_HINT = ("pass --config experiments/<name>.yaml (experiments/debug.yaml runs on a CPU; README 'Training'), "
               "then override single keys")
MAX_LINE = 400  # a message longer than this (jsonargparse lists every class it tried) is cut: --help has the rest


class NiTArgumentParser(LightningArgumentParser):
    """LightningArgumentParser without prefix abbreviations, whose errors are one line naming the nearest key."""

    # Set by NiTCLI.parse_arguments for the parse under way (the main and the subcommand parsers share them).
    config_given = True  # whether argv holds a --config
    command = PROG  # "python -m nit_lightning fit"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False  # `--trainer.max_step` must never silently mean `--trainer.max_steps`
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("NIT_TRACEBACK") or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # raises (or exits) as jsonargparse would
        parser = getattr(ex, "subcommand_parser", None) or self
        line = explain(message, option_strings(parser), config_given=self.config_given)
        sys.stderr.write(f"{self.command}: error: {line}\n")
        self.exit(2)


def option_strings(parser: Any) -> list[str]:
    """Every --key of a parser and of its subcommands' parsers."""
    found: list[str] = []
    for action in getattr(parser, "_actions", []):
        found += [o for o in action.option_strings if o.startswith("--")]
        for sub in (getattr(action, "choices", None) or {}).values() if hasattr(action, "_name_parser_map") else ():
            found += option_strings(sub)
    return found


def nearest(key: str, known: Iterable[str]) -> str | None:
    """The closest known key, first within the same section (`model.` for `model.lrr`), else anywhere."""
    known = list(dict.fromkeys(known))
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    for pool in ([k for k in known if k.startswith(section)] if section else [], known):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
        if match:
            return match[0]
    return None


def explain(message: str, known: list[str], *, config_given: bool = True) -> str:
    """jsonargparse's message as one line, with the nearest key or the missing --config named."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    unknown = re.match(r"unrecognized arguments: (.*)", text)
    if unknown:
        keys = [t.split("=", 1)[0] for t in unknown.group(1).split() if t.startswith("--")]
        hints = [f"{k} (did you mean {nearest(k, known)}?)" if nearest(k, known) else k for k in keys]
        return (f"unknown key{'s' if len(keys) > 1 else ''} {', '.join(hints) or unknown.group(1)}; keys are never "
                "abbreviated (--help lists them)")
    in_config = re.search(r"(Group|Subcommand) '([\w.]+)' does not accept (?:nested key|option) '([\w.]+)'", text)
    if in_config:
        kind, where, option = in_config.groups()
        key = f"--{option}" if kind == "Subcommand" else f"--{where}.{option}"
        guess = nearest(key, known)
        return (f"unknown key {key[2:]} in the config" + (f" (did you mean {guess[2:]}?)" if guess else "")
                + "; keys are never abbreviated (--help lists them)")
    if "arguments are required" in text and not config_given:
        return f"{text}: no --config was given; {CONFIG_HINT}"
    return text if len(text) <= MAX_LINE else text[:MAX_LINE] + " … (--help lists the keys; NIT_TRACEBACK=1 shows all)"
