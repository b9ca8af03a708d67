"""What `pip install vtprune` gets: the wheel built from this tree holds every file of the package; `import vtprune`
gives its public names, and imports torch and transformers only when one is used."""

import contextlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_the_wheel_holds_every_file_of_the_package(tmp_path):
    """A data file the package reads (the reference model's, say) but package-data leaves out would be missing only
    from installed copies: the suite runs on an editable install, which reads this tree."""
    from setuptools import build_meta

    source = tmp_path / "source"  # a copy: building writes build/ and egg-info next to pyproject.toml
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "vtprune", source / "vtprune", ignore=shutil.ignore_patterns("__pycache__"))
    with contextlib.chdir(source):  # setuptools builds the project in the working folder
        wheel = tmp_path / build_meta.build_wheel(str(tmp_path))
    packaged = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("vtprune/")}
    files = {path.relative_to(source).as_posix() for path in (source / "vtprune").rglob("*") if path.is_file()}
    assert files - packaged == set()
    assert "vtprune/reference_model/model.safetensors" in packaged


def fresh_python(code: str) -> str:
    """What `code` prints in a new interpreter (this one has imported everything already)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["eval", "--samples", "0"]])
def test_the_command_line_answers_help_and_a_bad_option_without_importing_torch(argv):
    printed = fresh_python(f"""
import contextlib, io, sys
from vtprune.cli import main
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    main({argv!r})
print(sorted(name for name in ("torch", "transformers") if name in sys.modules))
""")
    assert printed.strip() == "[]"


def test_the_public_names_are_there_and_vtprune_methods_stays_the_function():
    """The subpackage vtprune.methods (the methods' code), imported before or after the function vtprune.methods()
    is first used, does not take its name."""
    import vtprune

    for code in ("import vtprune.methods.fastv, vtprune; print(len(vtprune.methods()))",
                 "import vtprune; vtprune.methods(); import vtprune.methods.tome; print(len(vtprune.methods()))"):
        assert int(fresh_python(code)) == len(vtprune.methods()) > 10
    assert sorted(vtprune.__all__) == sorted(vtprune._MODULE_OF)
    for name in vtprune.__all__:
        assert getattr(vtprune, name) is not None
    assert callable(vtprune.apply) and vtprune.compile_prefill.__module__ == "vtprune.engine.compiled"
    with pytest.raises(AttributeError, match="no attribute 'bogus'"):
        vtprune.bogus
