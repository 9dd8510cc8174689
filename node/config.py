"""The node's settings tree (`NodeConfig`): validated once at the CLI edge, passed down by parts."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from intellect.node.engine import AutoEngineConfig, EngineConfig
from intellect.protocol.identity import default_state_dir
from intellect.protocol.settings import LayeredSettings
from intellect.protocol.swarm.config import SwarmConfig


class NodeConfig(LayeredSettings):
    """`intellect-node join` settings. Env prefix INTELLECT_NODE_ (nested: INTELLECT_NODE_SWARM__PORT)."""

    model_config = SettingsConfigDict(env_prefix="INTELLECT_NODE_", env_nested_delimiter="__", extra="forbid")

    state_dir: Path = Field(default_factory=default_state_dir,
                            description="Key, shard cache, outbox and logs live here.")
    run_id: str = Field(..., min_length=1, max_length=128, description="The run to join (printed by the coordinator).")
    coordinator_key: str = Field(..., pattern=r"^[0-9a-f]{64}$",
                                 description="The coordinator's public key (hex): pins who may sign policies.")
    swarm: SwarmConfig = Field(default_factory=SwarmConfig)
    engine: EngineConfig = Field(default_factory=AutoEngineConfig)
    submit_timeout_s: float = Field(600.0, gt=0, description="How long to wait for a verdict on one submission.")
    policy_wait_s: float = Field(600.0, gt=0, description="How long to wait for a fresh enough policy.")
    status_interval_s: float = Field(1.0, gt=0, description="How often status.json is rewritten.")
    restart_backoff_s: float = Field(5.0, gt=0, description="Wait before restarting the work loop after a failure.")
    max_batches: int | None = Field(None, ge=1, description="Stop after this many submitted batches (tests).")
    pipeline_depth: int = Field(1, ge=0, le=16, description=(
        "Batches that may wait in the outbox for their verdicts while the next one is generated (a submitter "
        "thread sends them in order); 0 sends each batch and waits for its verdict before generating the next."))
    prefetch_policy: bool = Field(True, description=(
        "Fetch each new policy in the background while generating (the run's state is read every 5 s); off, "
        "a new policy is fetched when the loop needs it, between batches."))

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return Path(v).expanduser().absolute()

    @property
    def coordinator_public_key(self) -> bytes:
        return bytes.fromhex(self.coordinator_key)
