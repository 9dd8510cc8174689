"""What a submission is judged against: the run's rules (fixed when the run starts, announced to
nodes in RunInfo) and the intake's validation settings (the coordinator's own thresholds).

`run_rules(config, run_id)` is the one place RunRules is built from a coordinator config; the
coordinator and `intellect-node verify` both use it, so they judge by the same rules.

What this module does not know: how the rules are checked (coordinator/checks.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from intellect.protocol.constants import MAX_SUBMISSION_BYTES
from intellect.protocol.tasks import Task, TaskConfig, setup_task

if TYPE_CHECKING:  # config.py imports IntakeConfig from here
    from intellect.coordinator.config import CoordinatorConfig


class IntakeConfig(BaseModel):
    """Validation settings of a run. Defaults check everything on every completion (small runs)."""

    model_config = ConfigDict(extra="forbid")

    max_submission_bytes: int = Field(MAX_SUBMISSION_BYTES, ge=1024, description="Largest submission accepted, bytes.")
    toploc_fraction: float = Field(1.0, ge=0.0, le=1.0,
                                   description="Share of completions re-run by prefill (TOPLOC, token and EOS checks).")
    toploc_max_exp_mismatches: int = Field(38, ge=0, le=128, description="TOPLOC threshold (spec A.8).")
    toploc_max_mant_err_mean: float = Field(10.0, ge=0, description="TOPLOC threshold (spec A.8).")
    toploc_max_mant_err_median: float = Field(8.0, ge=0, description="TOPLOC threshold (spec A.8).")
    eos_min_prob: float = Field(0.1, ge=0.0, le=1.0,
                                description="INTELLECT-2's termination rule: EOS should come where the policy gives it "
                                            "more than this...")
    eos_low_fraction: float = Field(0.25, ge=0.0, le=1.0,
                                    description="...but honest sampling sometimes picks a less likely EOS, so a batch "
                                                "fails only when more than this share of its EOS endings are below "
                                                "eos_min_prob (a node cutting answers short fails most of them)...")
    eos_floor_prob: float = Field(0.0, ge=0.0, le=1.0,
                                  description="...or when any EOS ending is below this floor (0: off).")
    max_logprob_abs_err: float = Field(0.25, gt=0,
                                       description="Largest mean |claimed - recomputed| sampled-token log-prob.")
    tie_tolerance: float = Field(0.5, ge=0, le=5,  # = protocol.sampling.DEFAULT_TIE_TOLERANCE
                                 description="Sampling check: a claimed token that is not the seeded sampler's pick "
                                             "but whose noisy score is within this (logit units) of it is a tie, "
                                             "not a mismatch (docs/protocol.md has the measurements).")
    reward_tolerance: float = Field(1e-5, gt=0, description="Allowed |claimed - recomputed| reward.")
    advantage_tolerance: float = Field(1e-3, gt=0, description="Allowed |claimed - recomputed| advantage.")
    prefill_batch_size: int = Field(8, ge=1, le=256, description="Completions per verification forward.")
    workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field("auto", description=(
        "Validator worker processes: the submit call stores the file and answers 'received', a worker runs the "
        "model checks, nodes ask for the verdict (0: the submit call validates and answers the verdict; auto: 1 "
        "where a GPU is present, else 0: on CPU cores alone a worker only competes with the trainer)."))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where validator workers run the prefill "
                                                                        "(auto: cuda when a GPU is present).")


@dataclass(frozen=True)
class RunRules:
    """What every submission of this run must have been made with."""

    run_id: str
    task: Task
    task_config: TaskConfig
    prompts_per_batch: int
    completions_per_prompt: int
    max_new_tokens: int
    temperature: float
    async_level: int


def run_rules(config: CoordinatorConfig, run_id: str) -> RunRules:
    r = config.rollouts
    return RunRules(run_id=run_id, task=setup_task(config.task), task_config=config.task,
                    prompts_per_batch=r.prompts_per_batch, completions_per_prompt=r.completions_per_prompt,
                    max_new_tokens=r.max_new_tokens, temperature=r.temperature, async_level=config.async_level)
