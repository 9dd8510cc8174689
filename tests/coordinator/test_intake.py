"""The validation pipeline against dishonest nodes: every rejection reason, triggered by a real node.

One coordinator per module (in this process, with its swarm on 127.0.0.1) and three node processes:
two honest `intellect-node join` nodes and `crafted_node.py`, a node built from the same `Worker` code
that tampers with its batches before signing them (one key per case). Some crafted submissions go over
the swarm; the rest come back as signed files that the test hands to `Coordinator.rpc_submit` in the
order it needs (e.g. the stale batch after two train steps). Each verdict is checked three ways: the
signed Verdict the node gets, the ledger's record (reason, which key it is charged to) and the strikes.

The tiny random model gives EOS a probability of about 2e-5 everywhere, below eos_min_prob (0.1), so
honest batches in which completions happen to sample EOS could be rejected; the run uses 1e-6, and the
improbable-EOS case (one completion cut short with an EOS) is judged with 0.1 and a floor of 1e-3.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest

from intellect.coordinator.rules import IntakeConfig
from intellect.coordinator.verdicts import NO_STRIKE, UNRECORDED, Reason
from intellect.protocol.identity import Identity, peer_id_of
from intellect.protocol.messages import Verdict, decode_body
from intellect.protocol.rollouts import read_rollouts
from intellect.protocol.wire import MessageKind, open_envelope
from tests.coordinator.procs import NODE_ENV, Procs, node_cmd, wait_while_alive

pytestmark = pytest.mark.slow  # one ~60 s set-up (coordinator, three node processes) shared by the module

CRAFTED = Path(__file__).with_name("crafted_node.py")
OVER_SWARM = ["honest_swarm", "wrong_model", "swapped_proofs", "forged_reward", "bad_signature_swarm"]
STRIKES_TO_BAN = 3

# every verdict of a case, in order
EXPECTED = {
    "honest_swarm": ["accepted"],
    "wrong_model": ["toploc_failed"],
    "edited_tokens": ["toploc_failed"],
    "swapped_proofs": ["toploc_failed"],
    "forged_reward": ["reward_mismatch"],
    "forged_advantage": ["advantage_mismatch"],
    "cherry_picked": ["prompt_mismatch"],
    "bad_target_length": ["bad_target_length"],
    "stale_policy": ["stale_policy"],
    "during_training": ["accepted"],
    "unknown_policy": ["unknown_policy"],
    "replay": ["accepted", "replay", "replay"],  # same bytes again, then the same file signed anew
    "batch_reused": ["accepted", "batch_reused"],
    "oversize": ["oversize"],
    "bad_signature": ["bad_envelope"] * 4 + ["accepted"],  # forged as the victim, then the victim itself
    "bad_signature_swarm": ["bad_envelope"],
    "wrong_run": ["wrong_run"],
    "malformed_parquet": ["bad_schema"],
    "wrong_temperature": ["bad_schema"],
    "banned": ["reward_mismatch"] * STRIKES_TO_BAN + ["banned"],
    "stop_without_eos": ["bad_termination"],
    "length_short": ["bad_termination"],
    "improbable_eos": ["bad_termination"],
    "forged_logprobs": ["token_prob_mismatch"],
    # sampling attacks: proofs rebuilt by prefill and log-probs recomputed, so only the seeded
    # sampler check (every token re-drawn) can tell; and a batch counter that skips ahead
    "edited_one_token": ["sampling_mismatch"],
    "colder_sampling": ["sampling_mismatch"],
    "greedy": ["sampling_mismatch"],
    "best_of_4": ["sampling_mismatch"],
    "other_model_reproved": ["sampling_mismatch"],
    "counter_skipped": ["counter_skipped"],
    # claims tilted inside the tolerances: accepted, and trained with the validator's numbers instead
    "tilted_claims": ["accepted"],
}
# failures anyone can send at line rate get a verdict but no ledger row (Intake counts them in memory)
UNRECORDED_REASONS = {r.value for r in UNRECORDED}



def settings(state_dir: Path, model: Path) -> dict:
    return {
        "state_dir": state_dir, "run_name": "intake", "model": str(model), "async_level": 1,
        "batches_per_step": 10_000,  # the test trains when it wants to (train_once)
        "ban_after_failures": STRIKES_TO_BAN, "threads": 1, "shard_size": 16_000_000,
        "rollouts": {"prompts_per_batch": 4, "completions_per_prompt": 4, "max_new_tokens": 24, "temperature": 1.0},
        "task": {"name": "arithmetic", "max_operand": 20, "operators": "+", "length_targets": [16, 24]},
        "trainer": {"lr": 2e-5, "warmup_steps": 0, "optimizer_steps_per_policy_step": 1, "temperature": 1.0,
                    "seq_len": 1024},
        "swarm": {"host": "127.0.0.1", "port": 0, "record_ttl_s": 600.0},
        "intake": {"max_submission_bytes": 256 * 1024, "eos_min_prob": 1e-6, "eos_floor_prob": 1e-6,
                   "toploc_fraction": 1.0},
    }


class Run:
    """The module's coordinator, node processes and every crafted submission's outcome."""

    def __init__(self, tmp: Path, coordinator, procs: Procs) -> None:
        self.tmp, self.coordinator, self.procs = tmp, coordinator, procs
        self.crafted: dict = {}
        self.verdicts: dict[str, list[Verdict]] = {}  # case -> signed verdicts, in order
        self.ledger_rows: dict[str, list] = {}  # case -> the ledger's VerdictRow for each in-process one
        self.num_rows = 0  # the ledger's verdict rows after the last in-process submission
        self.honest_dirs: list[Path] = []
        self.concurrent: dict = {}  # the `concurrent` case (submit_concurrently)

    def submit(self, case: str, data: bytes) -> Verdict:
        c = self.coordinator
        sealed = c.rpc_submit(bytes.fromhex(self.crafted["node_key"]), data)
        envelope = open_envelope(sealed, run_id=c.run_id, kinds={MessageKind.VERDICT},
                                 expected_sender=c.identity.public_key)
        verdict = decode_body(Verdict, envelope.body)
        self.verdicts.setdefault(case, []).append(verdict)
        rows = self.ledger_rows.setdefault(case, [])
        if sum(c.ledger.counts_by_reason().values()) > self.num_rows:  # an UNRECORDED reason writes none
            rows.append(c.ledger.recent_verdicts(1)[0])
        self.num_rows = sum(c.ledger.counts_by_reason().values())
        return verdict

    def files(self, case: str) -> list[bytes]:
        return [Path(f).read_bytes() for f in self.crafted["cases"][case]["files"]]

    def key(self, case: str) -> str:
        return self.crafted["cases"][case]["key"]

    def strikes(self, key_hex: str) -> float:
        return self.coordinator.ledger.strikes(key_hex)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_path, model_cache_dir):
    from intellect.coordinator.config import CoordinatorConfig
    from intellect.coordinator.runner import start_coordinator
    from intellect.protocol.model import tiny_model_dir

    tmp = tmp_path_factory.mktemp("intake")
    wrong_model = tiny_model_dir(model_cache_dir, seed=1)
    coordinator = start_coordinator(CoordinatorConfig(**settings(tmp / "coordinator", tiny_model_path)))
    procs = Procs(tmp)
    r = Run(tmp, coordinator, procs)
    try:
        run_file = tmp / "coordinator" / "run.toml"
        for i in range(2):
            r.honest_dirs.append(tmp / f"honest{i}")
            procs.start(f"honest{i}", node_cmd(run_file, r.honest_dirs[-1], "--max-batches", "1"), env=NODE_ENV)
        result = tmp / "crafted.json"
        procs.start("crafted", [sys.executable, str(CRAFTED), "--run-file", str(run_file), "--state-dir",
                                str(tmp / "crafted"), "--wrong-model", str(wrong_model), "--result", str(result),
                                "--over-swarm", ",".join(OVER_SWARM)])
        wait_while_alive(procs, result.exists, 1200, "the crafted node's submissions", "crafted")
        r.crafted = json.loads(result.read_text())
        for name in ("crafted", "honest0", "honest1"):
            assert procs.wait_exit(name, 240) == 0, procs.tails(name)
        submit_crafted(r)
        yield r
    finally:
        procs.close()
        coordinator.close()


def submit_crafted(r: Run) -> None:
    """Hand the signed files to the coordinator, in the order each case needs."""
    c = r.coordinator
    submit_concurrently(r)
    for case in EXPECTED:
        if case in OVER_SWARM or case in ("stale_policy", "during_training"):
            continue
        files = r.files(case)
        if case == "replay":
            files = [files[0], files[0], files[1]]
        if case == "improbable_eos":  # spec A.12's 0.1 and a per-completion floor, for this case alone
            relaxed, defaults = c.intake.ctx, IntakeConfig()
            c.intake.ctx = dataclasses.replace(relaxed, config=relaxed.config.model_copy(
                update={"eos_min_prob": defaults.eos_min_prob, "eos_floor_prob": 1e-3}))
        try:
            for data in files:
                r.submit(case, data)
        finally:
            if case == "improbable_eos":
                c.intake.ctx = relaxed
    # A batch arrives while the trainer works on step 0 (it has taken its batches): it must be queued
    # for step 1. The real trainer runs; the test only slips a real submission in before it.
    train_step = c.trainer.train_step
    c.trainer.train_step = lambda samples: (r.submit("during_training", r.files("during_training")[0]),
                                            train_step(samples))[1]
    try:
        c.train_once()
    finally:
        del c.trainer.train_step
    # a second train step: policy 0 falls out of the async window (collect step 2 - async level 1 > 0)
    c.train_once()
    assert c.latest_policy_step == c.collect_step == 2
    for data in r.files("stale_policy"):
        r.submit("stale_policy", data)


def submit_concurrently(r: Run) -> None:
    """The `concurrent` case: resends arrive while the first copy is being validated (held in its
    prefill until they are answered), then four copies of one file at once. A watcher checks
    "accepted/ == the ledger's accepted files" under the record lock all along."""
    c = r.coordinator
    x1, x2, y1, x3, y2, *zs = r.files("concurrent")
    ctx, entered, release, lock = c.intake.ctx, threading.Event(), threading.Event(), threading.Lock()

    def held_policy_for(step):
        with lock:
            first = not entered.is_set()
            entered.set()
        if first:
            release.wait(120)
        return ctx.policy_for(step)

    out: dict = {"verdicts": {}, "errors": [], "mismatches": []}

    def send(name: str, data: bytes) -> None:
        try:
            sealed = c.rpc_submit(bytes.fromhex(r.crafted["node_key"]), data)
            envelope = open_envelope(sealed, run_id=c.run_id, kinds={MessageKind.VERDICT},
                                     expected_sender=c.identity.public_key)
            out["verdicts"].setdefault(name, []).append(decode_body(Verdict, envelope.body).reason)
        except Exception as e:  # noqa: BLE001 -- an uncaught error is what this case is about
            out["errors"].append(f"{name}: {type(e).__name__}: {e}")

    def together(*sends: tuple[str, bytes]) -> list[threading.Thread]:
        threads = [threading.Thread(target=send, args=s) for s in sends]
        for t in threads:
            t.start()
        return threads

    done = threading.Event()

    def watch() -> None:
        db = sqlite3.connect(f"file:{c.ledger.path}?mode=ro", uri=True)
        while not done.is_set():
            with c.intake.record_lock:
                on_disk = {p.stem for p in (c.state_dir / "accepted").glob("*.parquet")}
                recorded = {h for (h,) in db.execute("SELECT s.content_hash FROM submissions s JOIN verdicts v"
                                                      " ON v.submission = s.id WHERE v.accepted = 1")}
            if on_disk != recorded:
                out["mismatches"].append(on_disk ^ recorded)
            done.wait(0.005)
        db.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    c.intake.ctx = dataclasses.replace(ctx, policy_for=held_policy_for)
    try:
        (first,) = together(("x1", x1))
        assert entered.wait(120), out
        for t in together(("x2", x2), ("x2", x2)):  # the same bytes twice, and x1 re-signed
            t.join()
        for t in together(("y1", y1)):  # another file for x1's seed
            t.join()
        release.set()
        first.join()
        for name, data in (("x3", x3), ("y2", y2)):  # one after the other: both hold x1's batch key
            for t in together((name, data)):
                t.join()
        for t in together(*[("z", z) for z in zs]):
            t.join()
    finally:
        release.set()
        c.intake.ctx = ctx
        done.set()
        watcher.join()
    r.concurrent = out


def verdicts_of(r: Run, case: str) -> list[dict]:
    if case in OVER_SWARM:
        return r.crafted["cases"][case]["verdicts"]
    return [v.model_dump() for v in r.verdicts[case]]


def test_honest_nodes_are_accepted(run):
    """Both `intellect-node join` processes got their batch accepted, and the ledger credits them."""
    ledger = run.coordinator.ledger
    for d in run.honest_dirs:
        lines = [json.loads(x) for x in (d / "verdicts.jsonl").read_text().splitlines()]
        assert [v["reason"] for v in lines] == ["accepted"], lines
        assert lines[0]["credit_tokens"] > 0
        key = Identity.from_pem((d / "node_key.pem").read_bytes()).public_key_hex
        node = next(n for n in ledger.node_table() if n.public_key == key)
        assert (node.accepted, node.rejected, node.banned) == (1, 0, False)
        assert ledger.credit_of(key) == lines[0]["credit_tokens"]
        stored = run.coordinator.state_dir / "accepted" / f"{lines[0]['file_sha256']}.parquet"
        assert read_rollouts(stored).meta.node_public_key == key


@pytest.mark.parametrize("case", list(EXPECTED))
def test_crafted_submission_gets_its_reason(run, case):
    """The node gets a signed verdict with the expected reason, and the ledger records that reason,
    charged to the signing key, unless it is one anyone can send at line rate (no envelope, a replay,
    a banned key): those have no row."""
    got = verdicts_of(run, case)
    assert [v["reason"] for v in got] == EXPECTED[case], [(v["reason"], v["detail"]) for v in got]
    for v in got:
        assert v["accepted"] == (v["reason"] == "accepted")
        assert v["accepted"] or v["detail"]
    rows = run.ledger_rows.get(case)
    if rows is None:  # sent over the swarm: find the ledger's verdicts of this key
        rows = [v for v in run.coordinator.ledger.recent_verdicts(10_000)[::-1] if v.node == run.key(case)]
        claimed = peer_id_of(bytes.fromhex(run.key(case)))  # a forged envelope's detail names the claimed key
        assert not [v for v in run.coordinator.ledger.recent_verdicts(10_000) if claimed in v.detail]
    assert [row.reason for row in rows] == [r for r in EXPECTED[case] if r not in UNRECORDED_REASONS]
    assert all(row.node == run.key(case) for row in rows), rows


def test_unrecorded_verdicts_are_counted(run):
    """Every verdict of an UNRECORDED reason is in the intake's counts, and none in the ledger."""
    sent = Counter(v.reason for vs in run.verdicts.values() for v in vs if v.reason in UNRECORDED_REASONS)
    assert sent and not set(sent) & set(run.coordinator.ledger.counts_by_reason())
    counts = run.coordinator.intake.counts_by_reason()
    assert all(counts[reason] >= n for reason, n in sent.items()), (sent, counts)


STATISTICAL = {"improbable_eos"}  # cases failed by a statistical check: a fraction of a strike


def test_strikes_count_only_proven_failures(run):
    """Strikes per key = its rejections that prove misbehaviour (a statistical one weighs a third);
    bans only at ban_after_failures strikes."""
    ledger = run.coordinator.ledger
    weight = run.coordinator.ledger.ban_policy.statistical_weight
    for case, reasons in EXPECTED.items():
        striking = [r for r in reasons if r != "accepted" and Reason(r) not in NO_STRIKE]
        expected = len(striking) * (weight if case in STATISTICAL else 1)
        assert run.strikes(run.key(case)) == pytest.approx(expected), case
        assert ledger.is_banned(run.key(case)) == (expected >= STRIKES_TO_BAN), case


def test_forged_signatures_do_not_strike_the_claimed_key(run):
    """Four envelopes claiming the victim's key with bad signatures (more than ban_after_failures), and
    replays of someone's bytes: no strike, no ban; the victim's own batch is accepted afterwards."""
    victim = run.key("bad_signature")
    assert run.strikes(victim) == 0 and not run.coordinator.ledger.is_banned(victim)
    assert run.verdicts["bad_signature"][-1].accepted
    assert run.strikes(run.key("replay")) == 0


def test_banned_key_is_refused(run):
    ledger = run.coordinator.ledger
    striker = run.key("banned")
    assert ledger.is_banned(striker)
    assert "reward_mismatch" in ledger.ban_reason(striker)
    assert run.verdicts["banned"][-1].reason == "banned"
    assert run.strikes(striker) == STRIKES_TO_BAN  # the refused submission is not a strike


def test_only_accepted_files_can_reach_the_trainer(run):
    """accepted/ holds exactly the ledger's accepted files, each readable; rejected ones are kept
    apart for audit; the first train step took every batch accepted before it."""
    c = run.coordinator
    accepted = {Path(s.stored_path) for step in range(c.collect_step + 1) for s in c.ledger.accepted_for_train_step(step)}
    assert accepted == set((c.state_dir / "accepted").glob("*.parquet"))
    for path in accepted:
        read_rollouts(path)
    assert not accepted & {c.state_dir / "accepted" / p.name for p in (c.state_dir / "rejected").glob("*.parquet")}
    assert c.history[0]["num_batches"] == len(c.ledger.accepted_for_train_step(0))
    assert not list((c.state_dir / "inbox").iterdir())


def test_the_trainer_takes_what_validation_computed_not_the_claims(run):
    """A file accepted with claims tilted inside the tolerances: the samples the trainer gets carry the
    recomputed advantages and the validator's prefill log-probs as mu, not the node's numbers."""
    import numpy as np

    from intellect.coordinator.validated import read_validated

    c = run.coordinator
    sha = run.verdicts["tilted_claims"][0].file_sha256
    stored = next(s for step in range(c.collect_step + 1) for s in c.ledger.accepted_for_train_step(step)
                  if s.content_hash == sha)
    batch = read_rollouts(stored.stored_path)
    samples, _, _ = c._load_samples([stored])
    assert len(samples) == len(batch.rows) and read_validated(Path(stored.stored_path), len(batch.rows))
    for row, (inputs, outputs, advantage, reward, mu, _) in zip(batch.rows, samples, strict=True):
        assert (inputs, outputs) == (row.input_tokens, row.output_tokens)
        assert abs(advantage - (row.advantage - 9e-4)) < 2e-5  # the node's claim minus its tilt
        assert reward == pytest.approx(row.reward, abs=1e-6)
        shift = np.asarray(row.output_logprobs) - np.asarray(mu)
        assert shift.mean() == pytest.approx(0.2, abs=0.02) and len(mu) == len(row.output_tokens)
    # honest files: the validator's log-probs are the node's, up to numerics
    honest = next(s for s in c.ledger.accepted_for_train_step(0) if s.content_hash != sha)
    (inputs, outputs, advantage, _, mu, _), *_ = c._load_samples([honest])[0]
    row = read_rollouts(honest.stored_path).rows[0]
    assert advantage == pytest.approx(row.advantage, abs=1e-6)
    assert np.abs(np.asarray(mu) - np.asarray(row.output_logprobs)).max() < 0.05


def test_batch_accepted_while_training_is_trained_next_step(run):
    """Accepted after step 0 took its batches: queued for step 1 and trained there, not left behind."""
    c = run.coordinator
    verdict = run.verdicts["during_training"][0]
    assert verdict.accepted and verdict.train_step == 1
    assert verdict.file_sha256 in {s.content_hash for s in c.ledger.accepted_for_train_step(1)}
    for step in (0, 1):
        assert c.history[step]["num_batches"] == len(c.ledger.accepted_for_train_step(step))


def test_every_rejection_reason_is_exercised(run):
    counts = run.coordinator.intake.counts_by_reason()
    # validator_failed needs worker processes that die: tests/coordinator/test_validators.py kills them
    missing = {r.value for r in Reason} - set(counts) - {Reason.VALIDATOR_FAILED.value}
    assert not missing


def test_verify_runs_the_intake_checks(run):
    """`verify` judges files with the intake's own check list: an accepted file passes every check;
    a forged advantage fails exactly the rewards check; another file for an accepted batch's seed
    (with a forged reward) fails the batch check, found in the coordinator's ledger, and the rewards
    check, while the accepted file, itself in the ledger, passes."""
    from intellect.coordinator.checks import CHECKS
    from intellect.coordinator.verify import check_name, verify_file

    state = run.coordinator.state_dir
    names = ["signature", "run"] + [check_name(c) for c in CHECKS]

    def failures(data: bytes) -> dict[str, str]:
        path = run.tmp / "verify.bin"
        path.write_bytes(data)
        results = verify_file(path, state)
        assert [r.name for r in results] == names
        return {r.name: r.detail for r in results if not r.ok}

    accepted, other = run.files("concurrent")[0], run.files("concurrent")[2]
    assert failures(accepted) == {}
    assert list(failures(other)) == ["batch unseen", "rewards"]
    failed = failures(run.files("forged_advantage")[0])
    assert list(failed) == ["rewards"] and failed["rewards"].startswith("advantage_mismatch")


def test_resends_during_validation_get_in_flight_and_one_file_is_accepted(run):
    """A resend of the file being validated, and another file for the same seed, are answered
    `in_flight` (not a crash on the inbox path); afterwards they are a replay and a reused batch.
    Four copies at once: one accepted. accepted/ matched the ledger at every look, nothing stuck in
    the inbox. In-flight answers and replays never strike; the reused batch does (with derived seeds an
    honest node's resend is the same file, so a second file for one batch is re-sampling): one strike."""
    got = run.concurrent
    assert got["errors"] == [] and got["mismatches"] == [], got
    v = got["verdicts"]
    assert v["x1"] == ["accepted"]
    assert sorted(v["x2"]) == ["in_flight", "replay"]  # one passes the replay guard, then finds x1 in flight
    assert v["y1"] == ["in_flight"]
    assert (v["x3"], v["y2"]) == (["replay"], ["batch_reused"])
    assert v["z"].count("accepted") == 1 and set(v["z"]) <= {"accepted", "in_flight", "replay"}, v["z"]
    c = run.coordinator
    assert not list((c.state_dir / "inbox").iterdir())
    assert run.strikes(run.key("concurrent")) == 1
