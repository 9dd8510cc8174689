"""Ledger: real SQLite files; bans, credit, replays, dashboard views, and SIGKILL safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from intellect.coordinator.ledger import (
    ACCEPTED,
    BanPolicy,
    DuplicateSubmission,
    Evidence,
    Ledger,
    LedgerError,
    Submission,
    Verdict,
)

A, B = "aa" * 32, "bb" * 32
OK = Verdict(True, ACCEPTED)


def sub(h: str, node: str = A, train_step: int = 5, tokens: int = 100) -> Submission:
    return Submission(
        h,
        node,
        policy_step=3,
        train_step=train_step,
        num_completions=4,
        num_tokens=tokens,
        stored_path=f"step_{train_step}/{h}.parquet",
    )


def test_wal_mode_and_schema_version(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(LedgerError, match="schema version 99"):
        Ledger(path)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(LedgerError, match="cannot open"):
        Ledger(tmp_path / "junk.sqlite")


def test_credit_and_accepted_listing(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        ledger.node_seen(A, "in-a", at=1.0)
        ledger.record_submission(sub("h1", tokens=100), OK, at=2.0)
        ledger.record_submission(sub("h2", tokens=50, train_step=6), OK, at=3.0)
        ledger.record_submission(sub("h3", tokens=70), Verdict(False, "proof_mismatch", "chunk 3"), at=4.0)
        assert ledger.credit_of(A) == 150
        assert ledger.credit_of(B) == 0
        assert [s.content_hash for s in ledger.accepted_for_train_step(5)] == ["h1"]
        assert ledger.accepted_for_train_step(5)[0].stored_path == "step_5/h1.parquet"
        assert [s.content_hash for s in ledger.accepted_for_train_step(6)] == ["h2"]
        assert ledger.counts_by_reason() == {ACCEPTED: 2, "proof_mismatch": 1}
        (row,) = ledger.node_table()
        assert (row.peer_id, row.accepted, row.rejected, row.tokens, row.last_seen, row.banned) == (
            "in-a",
            2,
            1,
            150,
            4.0,
            False,
        )
        recent = ledger.recent_verdicts(limit=2)
        assert [(v.content_hash, v.reason, v.detail) for v in recent] == [
            ("h3", "proof_mismatch", "chunk 3"),
            ("h2", ACCEPTED, ""),
        ]


def test_replay_detected_and_nothing_recorded(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        ledger.record_submission(sub("h1"), OK)
        assert ledger.is_duplicate("h1") and not ledger.is_duplicate("h2")
        with pytest.raises(DuplicateSubmission):
            ledger.record_submission(sub("h1", node=B), OK)  # B replays A's file
        assert ledger.credit_of(B) == 0 and ledger.credit_of(A) == 100
        assert ledger.counts_by_reason() == {ACCEPTED: 1}
        ledger.record_rejection(B, "replay", "h1")
        assert ledger.counts_by_reason() == {ACCEPTED: 1, "replay": 1}
        assert ledger.recent_verdicts(1)[0].content_hash is None


def test_automatic_ban_after_strikes_and_unban(tmp_path):
    with Ledger(tmp_path / "l.sqlite", BanPolicy(strikes=3, window=10)) as ledger:
        ledger.record_submission(sub("h1"), Verdict(False, "reward_mismatch"))
        ledger.record_rejection(A, "replay", evidence=Evidence.NONE)  # proves nothing: no strike
        ledger.record_submission(sub("h2"), OK)
        ledger.record_submission(sub("h3"), Verdict(False, "toploc_failed"))
        assert not ledger.is_banned(A) and ledger.strikes(A) == 2
        ledger.record_rejection(A, "bad_schema")  # the third strike among its last 4 judged submissions
        assert ledger.is_banned(A)
        assert "3 strikes in its last 4 judged submissions, last bad_schema" in ledger.ban_reason(A)
        assert not ledger.is_banned(B)
        ledger.unban(A)
        assert not ledger.is_banned(A) and ledger.strikes(A) == 0  # forgiven
        ledger.record_rejection(A, "bad_schema")
        assert not ledger.is_banned(A) and ledger.strikes(A) == 1
        ledger.ban(B, "manual: spam")
        assert ledger.is_banned(B) and ledger.ban_reason(B) == "manual: spam"
        assert {r.public_key: r.banned for r in ledger.node_table()} == {A: False, B: True}


def test_cheating_two_batches_in_three_is_banned(tmp_path):
    """Cheat, cheat, honest, cheat, ...: never three failures in a row, so a consecutive count never
    bans it; the window does, at the third cheat."""
    with Ledger(tmp_path / "l.sqlite", BanPolicy(strikes=3, window=10)) as ledger:
        for i in range(4):
            assert not ledger.is_banned(A)
            cheat = i % 3 != 2
            ledger.record_submission(sub(f"h{i}"), Verdict(False, "reward_mismatch") if cheat else OK)
        assert ledger.is_banned(A) and ledger.strikes(A) == 3


def test_strikes_expire_with_the_window(tmp_path):
    """A strike leaves the window after `window` newer judged submissions; verdicts that prove nothing
    (replays, stale files) neither count nor push strikes out."""
    with Ledger(tmp_path / "l.sqlite", BanPolicy(strikes=2, window=4)) as ledger:
        ledger.record_submission(sub("bad0"), Verdict(False, "reward_mismatch"))
        for i in range(10):
            ledger.record_rejection(A, "stale_policy", evidence=Evidence.NONE)
        assert ledger.strikes(A) == 1
        for i in range(4):
            ledger.record_submission(sub(f"ok{i}"), OK)
        assert ledger.strikes(A) == 0  # four judged submissions later, out of the window
        ledger.record_submission(sub("bad1"), Verdict(False, "reward_mismatch"))
        assert not ledger.is_banned(A)


def test_statistical_failures_add_a_fraction_of_a_strike(tmp_path):
    """Honest nodes fail a statistical test now and then: it takes three of them to make one strike."""
    with Ledger(tmp_path / "l.sqlite", BanPolicy(strikes=2, window=10, statistical_weight=1 / 3)) as ledger:
        for i in range(5):
            ledger.record_rejection(A, "bad_termination", evidence=Evidence.STATISTICAL)
        assert not ledger.is_banned(A) and ledger.strikes(A) == pytest.approx(5 / 3)
        ledger.record_rejection(A, "bad_termination", evidence=Evidence.STATISTICAL)
        assert ledger.is_banned(A)
        ledger.record_rejection(B, "toploc_failed")
        ledger.record_rejection(B, "bad_termination", evidence=Evidence.STATISTICAL)
        assert not ledger.is_banned(B) and ledger.strikes(B) == pytest.approx(4 / 3)


_V1_SCHEMA = """
CREATE TABLE nodes (public_key TEXT PRIMARY KEY, peer_id TEXT NOT NULL, first_seen REAL NOT NULL,
                    last_seen REAL NOT NULL, strikes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE submissions (id INTEGER PRIMARY KEY, content_hash TEXT NOT NULL UNIQUE,
    node TEXT NOT NULL REFERENCES nodes(public_key), policy_step INTEGER NOT NULL, train_step INTEGER NOT NULL,
    num_completions INTEGER NOT NULL, num_tokens INTEGER NOT NULL, received_at REAL NOT NULL, stored_path TEXT,
    batch_key TEXT UNIQUE);
CREATE INDEX submissions_train_step ON submissions(train_step);
CREATE TABLE verdicts (id INTEGER PRIMARY KEY, submission INTEGER UNIQUE REFERENCES submissions(id),
    node TEXT NOT NULL REFERENCES nodes(public_key), accepted INTEGER NOT NULL CHECK (accepted IN (0, 1)),
    reason TEXT NOT NULL, detail TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX verdicts_node ON verdicts(node);
CREATE TABLE bans (node TEXT PRIMARY KEY REFERENCES nodes(public_key), reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE credit (node TEXT PRIMARY KEY REFERENCES nodes(public_key), accepted_tokens INTEGER NOT NULL DEFAULT 0,
    accepted_completions INTEGER NOT NULL DEFAULT 0);
INSERT INTO nodes VALUES ('{a}', 'in-a', 1, 1, 2), ('{b}', 'in-b', 1, 1, 3);
INSERT INTO verdicts(node, accepted, reason, detail, at) VALUES ('{a}', 0, 'reward_mismatch', '', 1);
INSERT INTO bans VALUES ('{b}', 'automatic', 1);
PRAGMA user_version=1;
"""


def test_version_1_ledger_is_migrated(tmp_path):
    """A ledger written by the consecutive-strikes version opens: verdicts and bans kept, old strikes
    forgotten."""
    path = tmp_path / "l.sqlite"
    db = sqlite3.connect(path)
    db.executescript(_V1_SCHEMA.format(a=A, b=B))
    db.close()
    with Ledger(path, BanPolicy(strikes=2)) as ledger:
        assert ledger.is_banned(B) and not ledger.is_banned(A) and ledger.strikes(A) == 0
        assert ledger.counts_by_reason() == {"reward_mismatch": 1}
        ledger.record_rejection(A, "reward_mismatch")
        ledger.record_rejection(A, "reward_mismatch")
        assert ledger.is_banned(A)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2


def test_contradictory_verdict_rolls_back(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(ValueError, match="contradicts"):
            ledger.record_submission(sub("h1"), Verdict(True, "proof_mismatch"))
        assert not ledger.is_duplicate("h1")  # the whole transaction rolled back
        ledger.record_submission(sub("h1"), OK)
        assert ledger.credit_of(A) == 100


def test_persists_across_reopen(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger(path) as ledger:
        ledger.record_submission(sub("h1"), OK)
        ledger.ban(B, "manual")
    with Ledger(path) as ledger:
        assert ledger.credit_of(A) == 100 and ledger.is_banned(B) and ledger.is_duplicate("h1")


_WRITER = textwrap.dedent(
    """
    import sys
    from intellect.coordinator.ledger import ACCEPTED, BanPolicy, Ledger, Submission, Verdict
    ledger = Ledger(sys.argv[1], BanPolicy(strikes=10**9))
    i = 0
    while True:
        verdict = Verdict(True, ACCEPTED) if i % 3 else Verdict(False, "bad_reward", "x" * 500)
        ledger.record_submission(Submission(f"h{i}", f"{i % 7:064x}", 1, 2, 4, 10), verdict)
        print(i, flush=True)  # printed only after COMMIT returned
        i += 1
    """
)


def test_sigkill_during_writes_loses_nothing_committed(tmp_path):
    path = tmp_path / "l.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        last = -1
        for line in proc.stdout:
            last = int(line)
            if last >= 150:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert last >= 150
    with Ledger(path) as ledger:
        assert ledger.integrity_ok()
        db = sqlite3.connect(path)
        num_subs = db.execute("SELECT COUNT(*) FROM submissions").fetchone()[0]
        # every acknowledged write is there (the writer may have committed more before the kill)
        assert num_subs >= last + 1
        assert all(ledger.is_duplicate(f"h{i}") for i in range(num_subs))
        orphans = db.execute(
            "SELECT COUNT(*) FROM submissions s LEFT JOIN verdicts v ON v.submission = s.id WHERE v.id IS NULL"
        ).fetchone()[0]
        assert orphans == 0
        accepted = db.execute("SELECT COUNT(*) FROM verdicts WHERE accepted = 1").fetchone()[0]
        credited = db.execute("SELECT SUM(accepted_completions) FROM credit").fetchone()[0]
        assert credited == 4 * accepted
        db.close()


def test_requeue_moves_accepted_submissions_to_a_later_step(tmp_path):
    from intellect.coordinator.ledger import ACCEPTED, Ledger, Submission, Verdict

    with Ledger(tmp_path / "l.sqlite") as ledger:
        for i in range(3):
            ledger.record_submission(Submission(f"{i:064x}", "ab" * 32, 0, 5, 4, 10), Verdict(True, ACCEPTED))
        rows = ledger.accepted_for_train_step(5)
        ledger.requeue([r.id for r in rows[1:]], 6)
        assert [r.content_hash for r in ledger.accepted_for_train_step(5)] == [rows[0].content_hash]
        assert [r.content_hash for r in ledger.accepted_for_train_step(6)] == [r.content_hash for r in rows[1:]]


def test_close_waits_for_the_write_in_progress(tmp_path):
    """Seen in CI: a coordinator that was stopping closed its ledger while a request handler was still
    recording a verdict, and the process died of a segmentation fault (exit -11). close() now waits for
    the transaction in progress; calls after it raise instead."""
    import threading
    import time

    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    ledger.node_seen(A, "in-a", at=1.0)
    inside, release = threading.Event(), threading.Event()

    def writer():
        with ledger._transaction():
            inside.set()
            release.wait(10)
            ledger._db.execute("UPDATE nodes SET last_seen = 2.0 WHERE public_key = ?", (A,))

    thread = threading.Thread(target=writer)
    thread.start()
    assert inside.wait(10)
    closer = threading.Thread(target=ledger.close)
    closer.start()
    time.sleep(0.3)
    assert closer.is_alive(), "close() did not wait for the write in progress"
    release.set()
    thread.join(10)
    closer.join(10)
    assert not closer.is_alive()
    with pytest.raises(sqlite3.ProgrammingError):
        ledger.node_table()
    with Ledger(path) as again:
        assert again.node_table()[0].last_seen == 2.0
