"""Shared fixtures: one model cache per test session (or per CI cache via INTELLECT_MODEL_CACHE),
a tiny random Llama that loads like a real checkpoint, and SmolLM2-135M for slow tests.

The model fixtures are session-scoped and shared: do not modify their weights in a test; load
your own copy with `load_model(tiny_model_path)` for that.

A test module's temporary folders are deleted when the module ends with no failure: a whole run
(SmolLM2 checkpoints of several GB among them) then needs only the disk of its largest module, and a
failed module's folders stay for a look (all of them stay with INTELLECT_KEEP_TEST_DIRS=1)."""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the HF hub
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `coordinator` and `demo` set it (node/cli.py): tests run many busy processes

_basetemp: list[Path] = []  # pytest's base temporary folder, once a test asked for it
_kept: set[Path] = set()  # session-wide folders (the model cache) that outlive every module
_module_start: dict[str, set[Path]] = {}  # module -> folders under the base temp when it began
_failed_modules: set[str] = set()


@pytest.fixture(scope="session", autouse=True)
def _remember_basetemp(tmp_path_factory):
    _basetemp.append(tmp_path_factory.getbasetemp())


def _temp_folders() -> set[Path]:
    return set(_basetemp[0].iterdir()) if _basetemp else set()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    _module_start.setdefault(item.module.__name__, _temp_folders())
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        _failed_modules.add(item.module.__name__)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield  # the module's own fixtures are torn down by now when nextitem is elsewhere
    name = item.module.__name__
    keep = os.environ.get("INTELLECT_KEEP_TEST_DIRS") == "1" or name in _failed_modules
    if (nextitem is None or nextitem.module is not item.module) and not keep:
        for folder in _temp_folders() - _module_start.pop(name, set()) - _kept:
            shutil.rmtree(folder, ignore_errors=True)
    return result


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> Path:
    """Where converted models live; set INTELLECT_MODEL_CACHE to keep them across sessions."""
    env = os.environ.get("INTELLECT_MODEL_CACHE")
    path = Path(env) if env else tmp_path_factory.mktemp("models")
    _kept.add(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_path(model_cache_dir) -> Path:
    from intellect.protocol.model import tiny_model_dir

    return tiny_model_dir(model_cache_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    """(model, tokenizer): the tiny random Llama in `compute_dtype` (float32 here), eval mode. Shared."""
    from intellect.protocol.model import load_model

    return load_model(tiny_model_path)


@pytest.fixture(scope="session")
def smollm2_path(model_cache_dir) -> Path:
    """SmolLM2-135M-Instruct as a checkpoint folder (converted from the GGUF once; ~40 s)."""
    from intellect.protocol.model import default_model_dir

    return default_model_dir(model_cache_dir)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(model, tokenizer): SmolLM2-135M-Instruct in bf16, eval mode. Shared: do not mutate."""
    from intellect.protocol.model import load_model

    return load_model(smollm2_path)
