"""The README stays true: its example that "runs as it is" prints what its comments say, and its commands use
flags the CLI has."""

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from vtprune.synth.reference import REFERENCE_DIR

README = Path(__file__).parents[1] / "README.md"


def fenced_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of the README."""
    return re.findall(r"```(\w*)\n(.*?)```", README.read_text(), flags=re.S)


def complete_example() -> str:
    (example,) = [block for language, block in fenced_blocks() if language == "python" and "REFERENCE_DIR" in block]
    return example


def promised_outputs(code: str) -> list[str]:
    """The comment after each print(...) line: what the reader is told it prints."""
    return [line.split("#", 1)[1].strip() for line in code.splitlines() if line.strip().startswith("print(")]


@pytest.mark.skipif(not (REFERENCE_DIR / "config.json").exists(), reason="no reference model shipped")
def test_the_readme_example_prints_what_it_says():
    code = complete_example()
    promised = promised_outputs(code)
    assert len(promised) == 2  # the example's answers, then its stats
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    assert printed.getvalue().splitlines() == promised


def readme_commands() -> list[str]:
    """Every `vtprune SUBCOMMAND ...` the README shows: inline (a span may wrap) and in its shell blocks."""
    commands = [" ".join(span.split()) for span in re.findall(r"`(vtprune [a-z][^`]*)`", README.read_text())]
    for language, block in fenced_blocks():
        if language == "python":
            continue
        for line in block.splitlines():
            for command in line.split("#", 1)[0].split("&&"):
                if command.strip().startswith("vtprune "):
                    commands.append(command.strip())
    return commands


def test_the_readme_commands_use_flags_the_cli_has():
    """A flag renamed in the CLI but not in the README would send a reader to an argparse error."""
    from vtprune.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    commands = readme_commands()
    assert len(commands) >= 15
    for command in commands:
        words = shlex.split(command.replace("[", " ").replace("]", " "))
        assert words[1] in subcommands, command
        known = subcommands[words[1]]._option_string_actions
        unknown = [w for w in words[2:] if w.startswith("-") and w.split("=", 1)[0] not in known]
        assert not unknown, f"{command}: {unknown}"
