"""The README's example that "runs as it is" does, and prints what its comments say it prints."""

import contextlib
import io
import re
from pathlib import Path

import pytest

from vtprune.synth.reference import REFERENCE_DIR

README = Path(__file__).parents[1] / "README.md"


def complete_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (example,) = [block for block in blocks if "REFERENCE_DIR" in block]
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
