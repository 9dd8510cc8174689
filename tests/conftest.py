"""Shared fixtures: one model cache per test session (or per CI cache via INTELLECT_MODEL_CACHE),
a tiny random Llama that loads like a real checkpoint, and SmolLM2-135M for slow tests.

The model fixtures are session-scoped and shared: do not modify their weights in a test; load
your own copy with `load_model(tiny_model_path)` for that."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the HF hub
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `coordinator` and `demo` set it (node/cli.py): tests run many busy processes


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory) -> Path:
    """Where converted models live; set INTELLECT_MODEL_CACHE to keep them across sessions."""
    env = os.environ.get("INTELLECT_MODEL_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("models")


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
