"""`intellect-node verify FILE`: re-run the coordinator's checks on one submission, offline.

FILE is a signed submission (what a node sends; nodes keep copies in STATE/sent/, the coordinator in
STATE/accepted/ and STATE/rejected/) or a bare rollout parquet (then the signature check fails). The
run's rules and the policy come from a coordinator state dir; `--checkpoint` overrides the policy.
Each check runs on its own so the table shows every failure, not only the first.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from intellect.coordinator.config import CoordinatorConfig
from intellect.coordinator.intake import Intake, Rejected, RunRules
from intellect.coordinator.ledger import Ledger
from intellect.protocol.identity import load_identity
from intellect.protocol.messages import SubmissionHeader, decode_submission
from intellect.protocol.rollouts import RolloutFormatError, read_rollouts
from intellect.protocol.tasks import setup_task
from intellect.protocol.wire import MessageKind, WireRejected, open_envelope, run_id_for


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str = ""


def verify_file(path: Path, coordinator_state: Path, checkpoint: Path | None = None) -> list[CheckResult]:
    from intellect.protocol.model import load_model

    coordinator_state = Path(coordinator_state)
    config_path = coordinator_state / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path} not found: pass the coordinator's state dir (it writes config.json)")
    config = CoordinatorConfig.model_validate_json(config_path.read_text())
    run_id = run_id_for(load_identity(coordinator_state)[0].public_key, config.run_name)
    data = Path(path).read_bytes()
    results: list[CheckResult] = []

    envelope, parquet, header = None, data, None
    try:
        envelope = open_envelope(data, run_id=None, kinds={MessageKind.SUBMISSION}, max_age_s=None,
                                 max_bytes=config.intake.max_submission_bytes)
        header, parquet = decode_submission(envelope.body, config.intake.max_submission_bytes)
        results.append(CheckResult("signature", True, f"signed by {envelope.sender_id}"))
        results.append(CheckResult("run", envelope.run_id == run_id, f"{envelope.run_id} (this run: {run_id})"))
    except WireRejected as e:
        results.append(CheckResult("signature", False, f"not a valid signed submission: {e}"))
    try:
        batch = read_rollouts(parquet, max_bytes=config.intake.max_submission_bytes)
    except RolloutFormatError as e:
        return results + [CheckResult("schema", False, str(e))]
    step = batch.meta.policy_step
    policy_dir = checkpoint or coordinator_state / "checkpoints" / f"step_{step:08d}" / "policy"
    if not (Path(policy_dir) / "config.json").is_file():
        return results + [CheckResult("policy", False, f"no checkpoint for policy step {step} at {policy_dir}; "
                                                       "pass --checkpoint DIR")]
    model, tokenizer = load_model(Path(policy_dir))
    rules = RunRules(run_id=run_id, task=setup_task(config.task), task_config=config.task,
                     prompts_per_batch=config.rollouts.prompts_per_batch,
                     completions_per_prompt=config.rollouts.completions_per_prompt,
                     max_new_tokens=config.rollouts.max_new_tokens, temperature=config.rollouts.temperature,
                     async_level=config.async_level)
    with tempfile.TemporaryDirectory() as tmp, Ledger(Path(tmp) / "ledger.sqlite") as ledger:
        intake = Intake(config.intake, rules, ledger, Path(tmp), tokenizer, policy_for=lambda _: model,
                        steps=lambda: (step, step))
        sender = envelope.sender if envelope is not None else bytes.fromhex(batch.meta.node_public_key)
        header = header or SubmissionHeader(policy_step=step, batch_counter=batch.meta.batch_counter,
                                            num_completions=len(batch.rows), num_tokens=batch.num_output_tokens,
                                            file_sha256="0" * 64, file_size=len(parquet))
        env = SimpleNamespace(sender=sender)  # all the schema check reads of an envelope
        groups: list = []
        checks: list[tuple[str, Callable[[], object]]] = [
            ("schema and bounds", lambda: intake._parse(env, header, parquet)),
            ("prompts from the node's seed", lambda: groups.extend(intake._check_prompts(sender, batch))),
            ("rewards and advantages", lambda: intake._check_rewards(batch, groups or
                                                                     intake._check_prompts(sender, batch))),
            ("termination tokens", lambda: [intake._check_termination_tokens(i, r) for i, r in enumerate(batch.rows)]),
            ("EOS, token probabilities, TOPLOC", lambda: intake._check_with_model(batch, "0" * 64)),
        ]
        for name, run in checks:
            try:
                run()
                results.append(CheckResult(name, True))
            except Rejected as r:
                results.append(CheckResult(name, False, f"{r.reason}: {r.detail}"))
    return results
