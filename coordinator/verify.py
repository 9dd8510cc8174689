"""`intellect-node verify FILE`: re-run the coordinator's checks on one submission, offline.

FILE is a signed submission (what a node sends; nodes keep copies in STATE/sent/, the coordinator in
STATE/accepted/ and STATE/rejected/) or a bare rollout parquet (then the signature check fails and
the file is judged as sent by the key it names). The run's rules and the policy come from a
coordinator state dir; `--checkpoint` overrides the policy. The checks are the intake's own list
(`checks.CHECKS`), each run on its own so the table shows every failure, not only the first.

Judged as when it arrived: the file's own policy step counts as the latest (staleness depends on
when a file was sent, which a copy does not tell), and the batch check consults the coordinator's
ledger for another file answering the same seed.

What this module does not know: the replay guard and bans (state of the live intake).
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from intellect.coordinator.checks import CHECKS, Candidate, CheckContext, check_schema, read_batch
from intellect.coordinator.config import CoordinatorConfig
from intellect.coordinator.ledger import Ledger
from intellect.coordinator.rules import run_rules
from intellect.coordinator.verdicts import Rejected
from intellect.protocol.identity import load_identity
from intellect.protocol.messages import SubmissionHeader, decode_submission
from intellect.protocol.wire import MessageKind, WireRejected, open_envelope, run_id_for


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str = ""


def check_name(check) -> str:
    return check.__name__.removeprefix("check_").replace("_", " ")


def verify_file(path: Path, coordinator_state: Path, checkpoint: Path | None = None) -> list[CheckResult]:
    from intellect.protocol.model import eos_token_ids, load_model

    coordinator_state = Path(coordinator_state)
    config_path = coordinator_state / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path} not found: pass the coordinator's state dir (it writes config.json)")
    config = CoordinatorConfig.model_validate_json(config_path.read_text())
    run_id = run_id_for(load_identity(coordinator_state)[0].public_key, config.run_name)
    limit = config.intake.max_submission_bytes
    data = Path(path).read_bytes()
    results: list[CheckResult] = []

    sender, header, parquet = None, None, data
    try:
        envelope = open_envelope(data, run_id=None, kinds={MessageKind.SUBMISSION}, max_age_s=None, max_bytes=limit)
        header, parquet = decode_submission(envelope.body, limit)
        sender = envelope.sender
        results.append(CheckResult("signature", True, f"signed by {envelope.sender_id}"))
        results.append(CheckResult("run", envelope.run_id == run_id, f"{envelope.run_id} (this run: {run_id})"))
    except WireRejected as e:
        results.append(CheckResult("signature", False, f"not a valid signed submission: {e}"))
    try:
        batch = read_batch(parquet, config.intake)
        sender = sender or bytes.fromhex(batch.meta.node_public_key)
    except (Rejected, ValueError) as e:
        return results + [CheckResult("schema", False, getattr(e, "detail", str(e)))]
    step = batch.meta.policy_step
    header = header or SubmissionHeader(policy_step=step, batch_counter=batch.meta.batch_counter,
                                        num_completions=len(batch.rows), num_tokens=batch.num_output_tokens,
                                        file_sha256=hashlib.sha256(parquet).hexdigest(), file_size=len(parquet))
    policy_dir = checkpoint or coordinator_state / "checkpoints" / f"step_{step:08d}" / "policy"
    if not (Path(policy_dir) / "config.json").is_file():
        return results + [CheckResult("policy", False, f"no checkpoint for policy step {step} at {policy_dir}; "
                                                       "pass --checkpoint DIR")]
    model, tokenizer = load_model(Path(policy_dir))
    ledger_path = coordinator_state / "ledger.sqlite"
    with tempfile.TemporaryDirectory() as tmp, \
            Ledger(ledger_path if ledger_path.is_file() else Path(tmp) / "ledger.sqlite") as ledger:
        ctx = CheckContext(run=run_rules(config, run_id), config=config.intake, tokenizer=tokenizer,
                           eos_ids=eos_token_ids(tokenizer, policy_dir), policy_for=lambda _: model,
                           steps=lambda: (step, step), batch_holder=ledger.batch_holder,
                           highest_counter=ledger.highest_batch_counter,
                           row_secret=secret.read_bytes() if (secret := coordinator_state / "row_secret").is_file()
                           else b"")
        sub = Candidate(sender, header, batch)
        for check in CHECKS:
            try:
                check(ctx, sub)
                results.append(CheckResult(check_name(check), True))
            except Rejected as r:
                results.append(CheckResult(check_name(check), False, f"{r.reason}: {r.detail}"))
                if check is check_schema:  # the checks after it read rows of the announced shape
                    break
    return results
