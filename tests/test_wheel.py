"""What `pip install intellect-node` gets: the wheel holds every module of the three folders under the
`intellect.` prefix, the package list in pyproject.toml names every folder with an __init__.py, every core
dependency is used, and the vllm extra's range is the one the TOPLOC hooks accept.

The wheel is built from a copy of the sources (so the shared checkout gets no build/ folder), offline:
`pip wheel --no-deps --no-build-isolation` with the venv's setuptools. `.ci/wheel-smoke` goes further:
it installs the wheel into a fresh venv and runs the commands from there."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOPS = ("node", "protocol", "coordinator")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# core dependencies no module imports by name, and why they are still needed
USED_INDIRECTLY = {"gguf": "transformers reads the SmolLM2 GGUF (weights and tokenizer) with it",
                   "accelerate": "transformers requires it to load a GGUF file (from_pretrained(gguf_file=...))"}
IMPORT_NAMES = {"pydantic-settings": "pydantic_settings", "prometheus-client": "prometheus_client"}


def source_modules() -> set[str]:
    """intellect/<top>/... paths of every .py the three folders hold."""
    return {f"intellect/{p.relative_to(ROOT).as_posix()}" for top in TOPS for p in (ROOT / top).rglob("*.py")
            if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for top in TOPS:
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "-q", "-w", str(dist)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    (found,) = dist.glob("intellect_node-*.whl")
    return found


def test_the_wheel_holds_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    in_wheel = {n for n in names if n.endswith(".py")}
    missing = source_modules() - in_wheel
    assert not missing, f"modules missing from the wheel (add their package to pyproject.toml): {sorted(missing)}"
    assert in_wheel == source_modules(), f"unexpected modules in the wheel: {sorted(in_wheel - source_modules())}"
    assert not any(n.split("/")[0] in TOPS for n in names), "a generic top-level package would shadow others"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "intellect-node = intellect.node.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_pyproject_lists_every_package():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {"intellect." + ".".join(p.parent.relative_to(ROOT).parts) for top in TOPS
               for p in (ROOT / top).rglob("__init__.py")}
    assert listed == on_disk


def _imported_top_names() -> set[str]:
    names = set()
    for top in TOPS:
        for path in (ROOT / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
    return names


def test_every_core_dependency_is_imported():
    from packaging.requirements import Requirement

    imported = _imported_top_names()
    unused = []
    for spec in PYPROJECT["project"]["dependencies"]:
        name = Requirement(spec).name
        if name not in USED_INDIRECTLY and IMPORT_NAMES.get(name, name.replace("-", "_")) not in imported:
            unused.append(name)
    assert unused == [], f"core dependencies nothing imports (drop them or move them to an extra): {unused}"
    assert "psutil" not in imported, "psutil is a test-only dependency (the dev extra)"


def test_vllm_extra_is_the_range_the_hooks_accept():
    from packaging.requirements import Requirement

    from intellect.node.engine._vllm_hooks import SUPPORTED

    (spec,) = PYPROJECT["project"]["optional-dependencies"]["vllm"]
    req = Requirement(spec)
    assert req.name == "vllm"
    (major, low), (_, high) = SUPPORTED
    for minor in range(max(low - 3, 0), high + 3):
        for patch in (0, 9):
            version = f"{major}.{minor}.{patch}"
            assert req.specifier.contains(version) == (SUPPORTED[0] <= (major, minor) < SUPPORTED[1]), version
