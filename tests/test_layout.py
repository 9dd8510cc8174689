"""The house rules that code can check: protocol/ is the bottom of the graph, imports no app, no GPU-only
library and no UI; the protocol's shared numbers are defined once; example configs parse."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_protocol_never_imports_the_apps():
    offenders = [(str(p.relative_to(ROOT)), m) for p in (ROOT / "protocol").rglob("*.py")
                 for m in imported_modules(p) if m.startswith(("intellect.node", "intellect.coordinator"))]
    assert offenders == []


def test_protocol_has_no_ui():
    """Progress, spinners and screens belong to the apps (protocol/model.py logs; the CLI shows progress)."""
    offenders = [(str(p.relative_to(ROOT)), m) for p in (ROOT / "protocol").rglob("*.py")
                 for m in imported_modules(p) if m.split(".")[0] in ("rich", "typer", "tqdm")]
    assert offenders == []


def test_protocol_numbers_are_defined_once():
    """TOPLOC's chunk and top-k and the 64 MiB submission limit live in protocol/constants.py only."""
    literals = re.compile(r"64 \* 1024 \* 1024|64 \* 2 ?\*\* ?20|\b(chunk_size|topk|CHUNK|TOPK)(: int)? = (32|128)\b")
    offenders = [f"{p.relative_to(ROOT)}:{n}" for top in ("protocol", "node", "coordinator")
                 for p in (ROOT / top).rglob("*.py") if p.name != "constants.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if literals.search(line)]
    assert offenders == [], "use intellect.protocol.constants"


def test_importing_protocol_pulls_in_no_app_and_no_gpu_library():
    code = ("import sys, intellect.protocol, intellect.protocol.wire, intellect.protocol.messages, "
            "intellect.protocol.manifest, intellect.protocol.identity, intellect.protocol.rollouts, "
            "intellect.protocol.tasks, intellect.protocol.swarm, intellect.protocol.toploc; "
            "bad = [m for m in sys.modules if m.startswith(('intellect.node', 'intellect.coordinator', 'vllm', "
            "'hivemind'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_nothing_generic_lands_at_the_top_of_site_packages():
    import intellect.node
    import intellect.protocol

    assert Path(intellect.protocol.__file__).parent == ROOT / "protocol"
    assert intellect.node.__name__ == "intellect.node"
    for generic in ("node", "protocol", "coordinator"):
        found = subprocess.run([sys.executable, "-c", f"import importlib.util; print(importlib.util.find_spec('{generic}'))"],
                               capture_output=True, text=True, cwd="/", check=True).stdout.strip()
        assert found == "None", f"a top-level '{generic}' package is importable: {found}"


@pytest.mark.parametrize("name", ["run.toml", "node.toml"])
def test_example_configs_parse(name, monkeypatch):
    from intellect.coordinator.config import CoordinatorConfig
    from intellect.node.config import NodeConfig
    from intellect.protocol.settings import load_settings

    path = ROOT / "docs" / "examples" / name
    if name == "run.toml":
        cfg = load_settings(CoordinatorConfig, path)
        assert cfg.run_name == "arith-smollm2" and cfg.rollouts.completions_per_prompt == 8
    else:
        cfg = load_settings(NodeConfig, path, {"run_id": "r-1", "coordinator_key": "ab" * 32})
        assert cfg.swarm.max_upload_mbit == 100.0 and cfg.engine.type == "auto"


def test_settings_layering_toml_env_flags(tmp_path, monkeypatch):
    from intellect.coordinator.config import CoordinatorConfig
    from intellect.protocol.settings import ConfigError, load_settings

    toml = tmp_path / "run.toml"
    toml.write_text('run_name = "from-toml"\nasync_level = 3\nkeep_checkpoints = 10\n[trainer]\nlr = 0.5\n')
    assert load_settings(CoordinatorConfig, toml).async_level == 3
    monkeypatch.setenv("INTELLECT_COORD_ASYNC_LEVEL", "4")
    monkeypatch.setenv("INTELLECT_COORD_TRAINER__LR", "0.25")
    cfg = load_settings(CoordinatorConfig, toml)
    assert (cfg.async_level, cfg.trainer.lr, cfg.run_name) == (4, 0.25, "from-toml")
    cfg = load_settings(CoordinatorConfig, toml, {"async_level": 5, "trainer.lr": None})
    assert (cfg.async_level, cfg.trainer.lr) == (5, 0.25)
    toml.write_text("batches_per_step = 0\n")
    with pytest.raises(ConfigError, match="batches_per_step"):
        load_settings(CoordinatorConfig, toml)
