"""Every option of every suite command says what it does and what its default is (issue 22, item 5): the test walks
the parsers of `python -m nit_lightning <command>` (sub-commands included)."""
from __future__ import annotations

import argparse
import importlib

import pytest

from nit_lightning.__main__ import COMMANDS


def _parsers(parser: argparse.ArgumentParser, name: str):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _all_parsers():
    for command, (module, _) in COMMANDS.items():
        yield from _parsers(importlib.import_module(module).build_parser(), command)


PARSERS = list(_all_parsers())


@pytest.mark.parametrize("name, parser", PARSERS, ids=[name for name, _ in PARSERS])
def test_every_option_has_a_help_line_and_shows_its_default(name, parser):
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action) if action.help else ""
        flag = action.option_strings[-1]
        if not action.help or not action.help.strip():
            problems.append(f"{flag}: no help line")
        elif not ("default" in text.lower() or "required" in text):
            problems.append(f"{flag}: no default shown ({text!r})")
        elif "default: None" in text:
            problems.append(f"{flag}: 'default: None' says nothing; say what happens ({text!r})")
        if parser.allow_abbrev:
            problems.append("the parser allows abbreviations")
    assert not problems, f"{name}: " + "; ".join(problems)


def test_the_issue_examples_show_their_defaults():
    """prepare --codec (pixel:8: forgetting dcae: on ImageNet quietly wrote 192-channel pixel shards), --device, and
    sample's --num-samples, --features (sweep), --rope-layout, --seed."""
    def option(command: str, flag: str) -> str:
        text = {name: parser.format_help() for name, parser in PARSERS}[command]
        return " ".join(text.split(f"\n  {flag} ", 1)[1].split("\n  --", 1)[0].split())

    assert "default: pixel:8" in option("prepare", "--codec") and "dcae:PATH" in option("prepare", "--codec")
    assert "(default: cpu)" in option("prepare", "--device")
    for flag in ("--num-samples", "--rope-layout", "--seed"):
        assert "default" in option("sample", flag), flag
    assert "default: inception" in option("sweep", "--features")
