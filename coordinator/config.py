"""The coordinator's settings tree (`CoordinatorConfig`), one per run: validated once at the CLI edge."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from intellect.coordinator.rules import IntakeConfig
from intellect.coordinator.trainer.config import TrainerConfig
from intellect.protocol.settings import LayeredSettings
from intellect.protocol.swarm.config import SwarmConfig
from intellect.protocol.tasks import TaskConfig


class RolloutConfig(BaseModel):
    """What one node batch looks like; announced to nodes, checked on every submission."""

    model_config = ConfigDict(extra="forbid")

    prompts_per_batch: int = Field(4, ge=1, le=4096, description="Prompts in one node batch (seeded, spec B.3).")
    completions_per_prompt: int = Field(4, ge=2, le=256, description="GRPO group size n.")
    max_new_tokens: int = Field(32, ge=1, le=131072, description="Most output tokens per completion.")
    temperature: float = Field(0.6, gt=0, le=10, description="Sampling temperature (the loss uses the same tau).")


class EvalConfig(BaseModel):
    """Held-out evaluation of the policy while it trains (coordinator/heldout.py); off by default."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(0, ge=0, le=1_000_000, description="Score the policy on held-out problems every this many "
                                                          "train steps, and the first and last policies "
                                                          "(0: off). Needs task.heldout > 0.")
    num_problems: int = Field(64, ge=1, le=100_000, description="Held-out problems per evaluation: the split's "
                                                                "first N, the same ones every time.")
    samples: int = Field(4, ge=1, le=256, description="k of mean@k: sampled completions per problem.")
    temperature: float | None = Field(None, gt=0, le=10, description="Temperature of the mean@k samples "
                                                                     "(None: rollouts.temperature).")
    max_new_tokens: int | None = Field(None, ge=1, le=131072, description="Most tokens per completion "
                                                                          "(None: rollouts.max_new_tokens).")
    batch_size: int = Field(64, ge=1, le=4096, description="Completions generated together.")


class CoordinatorConfig(LayeredSettings):
    """`intellect-node coordinator` settings. Env prefix INTELLECT_COORD_ (nested: INTELLECT_COORD_TRAINER__LR)."""

    model_config = SettingsConfigDict(env_prefix="INTELLECT_COORD_", env_nested_delimiter="__", extra="forbid")

    state_dir: Path = Field(Path("coordinator-state"), description="Key, ledger, rollouts, checkpoints.")
    run_name: str = Field("demo", pattern=r"^[A-Za-z0-9_-]{1,48}$", description="Human name of the run.")
    model: str = Field("smollm2", description='"smollm2" (SmolLM2-135M-Instruct, shipped), "tiny" (random, '
                                              'for tests) or a path to a checkpoint folder.')
    async_level: int = Field(2, ge=0, le=64, description="Rollouts of policy s - async_level may train step s.")
    batches_per_step: int = Field(2, ge=1, le=100_000, description="Accepted node batches that make one train step.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many train steps (None: run forever).")
    ban_after_failures: int = Field(3, ge=1, le=10_000, description="Strikes within the ban window that ban a key "
                                                                    "(one per hard failure, see statistical_strike).")
    ban_window: int = Field(10, ge=1, le=10_000, description="Strikes count over a key's last this many judged "
                                                             "submissions (accepted, or rejected with a strike).")
    statistical_strike: float = Field(1 / 3, ge=0, le=1, description="The strike of a failed statistical check "
                                                                     "(EOS probability): honest nodes fail "
                                                                     "those now and then.")
    keep_checkpoints: int = Field(3, ge=1, le=100, description="Training checkpoints kept on disk.")
    full_state_every: int = Field(10, ge=1, le=100_000, description="Write the whole training state (fp32 "
                                  "weights, optimizer, RNG: 3-4x the policy) every this many steps, at the "
                                  "last step and at exit; the other steps export the bf16 policy alone. A "
                                  "crash resumes from the newest whole state and loses the training of the "
                                  "steps after it (their rollouts were trained on, their policies stay out).")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Serve Prometheus /metrics on 127.0.0.1:PORT.")
    shard_size: int = Field(50_000_000, ge=1 << 16, description="Checkpoint shard size in bytes (SHARDCAST: 50 MB).")
    publish_in_background: bool = Field(True, description="Publish each new policy (shard, sign, store the "
                                                           "manifest, then announce it) in a thread while the next "
                                                           "step trains; false: inline, before the next step.")
    threads: int | None = Field(None, ge=1, description="torch threads for training and validation.")
    rollouts: RolloutConfig = Field(default_factory=RolloutConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    swarm: SwarmConfig = Field(default_factory=SwarmConfig)
    intake: IntakeConfig = Field(default_factory=IntakeConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return Path(v).expanduser().absolute()

    @model_validator(mode="after")
    def _consistent(self) -> CoordinatorConfig:
        if self.keep_checkpoints < self.async_level + 1:
            raise ValueError(f"keep_checkpoints ({self.keep_checkpoints}) must be at least async_level + 1 "
                             f"({self.async_level + 1}): submissions of every policy still accepted are verified "
                             "against its checkpoint")
        if abs(self.trainer.temperature - self.rollouts.temperature) > 1e-9:
            raise ValueError(f"trainer.temperature ({self.trainer.temperature}) must equal rollouts.temperature "
                             f"({self.rollouts.temperature}): the loss uses the sampling temperature (spec B.9)")
        if self.eval.every and not self.task.heldout:
            raise ValueError(f"eval.every ({self.eval.every}) scores the policy on held-out problems, but task.heldout "
                             "is 0: set task.heldout to the number of problems to keep out of training")
        return self
