"""What `pip install vtprune` gets: the wheel built from this tree holds every file of the package."""

import contextlib
import shutil
import zipfile
from pathlib import Path

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
