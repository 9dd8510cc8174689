"""Loading one settings tree per process: defaults < TOML file < environment < command-line flags.

Both apps build their config with `load_settings(NodeConfig, toml_path, flags)`. Environment
variables use the class's prefix and `__` for nesting (INTELLECT_NODE_SWARM__PORT=4001).
What this module does not know: any field; it only layers sources and reports errors in plain words.
"""

from __future__ import annotations

import contextvars
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource

_toml_path: contextvars.ContextVar[Path | None] = contextvars.ContextVar("toml_path", default=None)

S = TypeVar("S", bound="LayeredSettings")


class ConfigError(ValueError):
    """A config file or flag is invalid; the message names the field and what is wrong."""


class LayeredSettings(BaseSettings):
    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings, env_settings,
                                   dotenv_settings, file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        path = _toml_path.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def _nest(flags: dict[str, Any]) -> dict[str, Any]:
    """{"swarm.port": 1} -> {"swarm": {"port": 1}}; None values (flag not given) are dropped."""
    out: dict[str, Any] = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_settings(cls: type[S], toml_path: Path | None = None, flags: dict[str, Any] | None = None) -> S:
    if toml_path is not None:
        toml_path = Path(toml_path)
        if not toml_path.is_file():
            raise ConfigError(f"config file {toml_path} does not exist")
        try:
            tomllib.loads(toml_path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{toml_path} is not valid TOML: {e}") from None
    token = _toml_path.set(toml_path)
    try:
        return cls(**_nest(flags or {}))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"invalid {cls.__name__}: {problems}") from None
    finally:
        _toml_path.reset(token)
