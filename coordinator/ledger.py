"""The coordinator's ledger: nodes, submissions, verdicts, bans and credit in one SQLite file.

WAL mode with synchronous=FULL: every recorded verdict survives the process being killed at any
moment (and a power cut), and readers (dashboard) never block the writer. A submission and its
verdict, the strike it carries, credit and any automatic ban are written in ONE transaction, so a
crash can never leave a verdict without its credit or a strike without its ban.

The ban policy (`BanPolicy`) lives here; what a rejection proves is the caller's to say (`Evidence`):
hard evidence (a proof, token, reward or prompt mismatch, a malformed file from a signed sender) is
one strike; a failed statistical test (honest nodes fail one now and then) is a fraction of one;
failures that prove nothing about the signer are none. A key is banned once the strikes among its
last `window` judged submissions (accepted ones and those that carried a strike) reach `strikes`,
so cheating two batches in three is banned, however the cheats and honest batches interleave.
Unbanning forgives every strike so far. Safe to share between threads: one connection behind a
lock (intake handlers and the trainer loop record from different threads).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Self

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE nodes (
    public_key TEXT PRIMARY KEY,
    peer_id TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    forgiven_verdict INTEGER NOT NULL DEFAULT 0 -- strikes count only after this verdict id (unban)
);
CREATE TABLE submissions (
    id INTEGER PRIMARY KEY,
    content_hash TEXT NOT NULL UNIQUE,
    node TEXT NOT NULL REFERENCES nodes(public_key),
    policy_step INTEGER NOT NULL,
    train_step INTEGER NOT NULL,
    num_completions INTEGER NOT NULL,
    num_tokens INTEGER NOT NULL,
    received_at REAL NOT NULL,
    stored_path TEXT,
    batch_key TEXT UNIQUE                       -- node:policy_step:batch_counter, one file per seed
);
CREATE INDEX submissions_train_step ON submissions(train_step);
CREATE TABLE verdicts (
    id INTEGER PRIMARY KEY,
    submission INTEGER UNIQUE REFERENCES submissions(id),  -- NULL: rejected before storage
    node TEXT NOT NULL REFERENCES nodes(public_key),
    accepted INTEGER NOT NULL CHECK (accepted IN (0, 1)),
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL,
    strike REAL NOT NULL DEFAULT 0              -- towards a ban: 1 hard evidence, less for statistical
);
CREATE INDEX verdicts_node ON verdicts(node);
CREATE TABLE bans (
    node TEXT PRIMARY KEY REFERENCES nodes(public_key),
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE credit (
    node TEXT PRIMARY KEY REFERENCES nodes(public_key),
    accepted_tokens INTEGER NOT NULL DEFAULT 0,
    accepted_completions INTEGER NOT NULL DEFAULT 0
);
"""

# The highest batch counter seen per (node, policy step), accepted or not: a counter may be at most
# one past it (checks.check_batch_counter). Created where missing, so older ledgers gain it as is.
_BATCH_COUNTERS = """
CREATE TABLE IF NOT EXISTS batch_counters (
    node TEXT NOT NULL,
    policy_step INTEGER NOT NULL,
    highest INTEGER NOT NULL,
    PRIMARY KEY (node, policy_step)
)
"""

# v1 -> v2: strikes per verdict (the ban window) instead of a consecutive count per node; strikes
# recorded before the upgrade are forgotten, bans stay
_MIGRATE_V1 = """
ALTER TABLE verdicts ADD COLUMN strike REAL NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN forgiven_verdict INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes DROP COLUMN strikes
"""

ACCEPTED = "accepted"
MAX_DETAIL_CHARS = 2000


class Evidence(StrEnum):
    """What a rejection proves about the key that signed it."""

    NONE = "none"  # nothing: a bad signature, a replay, a stale policy, a resend in flight
    STATISTICAL = "statistical"  # a statistical test failed (honest nodes fail one now and then)
    HARD = "hard"  # the signer misbehaved: a proof, token, reward or prompt mismatch, a bad file


@dataclass(frozen=True)
class BanPolicy:
    strikes: float = 3.0  # ban once a key's strikes within the window reach this...
    window: int = 10  # ...counted over its last `window` judged submissions
    statistical_weight: float = 1 / 3  # the strike of one failed statistical test

    def __post_init__(self) -> None:
        if self.strikes <= 0 or self.window < 1 or not 0 <= self.statistical_weight <= 1:
            raise ValueError(f"ban policy needs strikes > 0, window >= 1, 0 <= statistical_weight <= 1: {self}")

    def weight(self, evidence: Evidence) -> float:
        return {Evidence.NONE: 0.0, Evidence.STATISTICAL: self.statistical_weight, Evidence.HARD: 1.0}[evidence]


class LedgerError(Exception):
    """The ledger file has an unknown schema version or cannot be opened."""


class DuplicateSubmission(LedgerError):
    """A submission with this content hash is already recorded (a replay)."""


@dataclass(frozen=True)
class Submission:
    content_hash: str
    node: str  # public key hex
    policy_step: int
    train_step: int
    num_completions: int
    num_tokens: int
    stored_path: str | None = None
    batch_key: str | None = None  # node:policy_step:batch_counter; a seed's prompts are answered once


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str  # ACCEPTED or a reason code from intake, e.g. "proof_mismatch"
    detail: str = ""


@dataclass(frozen=True)
class NodeRow:
    public_key: str
    peer_id: str
    accepted: int
    rejected: int
    tokens: int
    last_seen: float
    banned: bool


@dataclass(frozen=True)
class VerdictRow:
    node: str
    content_hash: str | None
    accepted: bool
    reason: str
    detail: str
    at: float


@dataclass(frozen=True)
class SubmissionRow:
    id: int
    content_hash: str
    node: str
    policy_step: int
    train_step: int
    num_completions: int
    num_tokens: int
    received_at: float
    stored_path: str | None


class Ledger:
    def __init__(self, path: str | Path, ban_policy: BanPolicy | None = None):
        self.path = Path(path)
        self.ban_policy = ban_policy or BanPolicy()
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE) below
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=False)
            self._lock = threading.RLock()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            self._db.execute(_BATCH_COUNTERS)
        except sqlite3.DatabaseError as e:
            raise LedgerError(f"cannot open ledger {self.path}: {e}") from e

    def _migrate(self) -> None:
        with self._transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version == 1:
                for statement in filter(str.strip, _MIGRATE_V1.split(";")):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise LedgerError(
                    f"{self.path} has schema version {version}, this code knows {SCHEMA_VERSION}"
                )

    def _transaction(self):
        return _Transaction(self._db, self._lock)

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        """After the transaction in progress, if any: closing under a writer's feet crashes the process
        (a request handler still recording a verdict while the coordinator stops); later calls raise
        sqlite3.ProgrammingError."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ writes

    def node_seen(self, public_key: str, peer_id: str, at: float | None = None) -> None:
        at = time.time() if at is None else at
        with self._transaction():
            self._touch(public_key, peer_id, at)

    def _touch(self, public_key: str, peer_id: str | None, at: float) -> None:
        self._db.execute(
            "INSERT INTO nodes(public_key, peer_id, first_seen, last_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(public_key) DO UPDATE SET last_seen = MAX(last_seen, excluded.last_seen), "
            "peer_id = CASE WHEN ? IS NULL THEN peer_id ELSE excluded.peer_id END",
            (public_key, peer_id or "", at, at, peer_id),
        )

    def record_submission(self, submission: Submission, verdict: Verdict, at: float | None = None,
                          evidence: Evidence = Evidence.HARD) -> int:
        """Store a submission with its verdict, credit or strike and any automatic ban, atomically
        (`evidence`: what a rejection proves). Returns the submission id; raises
        DuplicateSubmission (recording nothing) on a replay."""
        at = time.time() if at is None else at
        s = submission
        with self._transaction():
            self._touch(s.node, None, at)
            try:
                cur = self._db.execute(
                    "INSERT INTO submissions(content_hash, node, policy_step, train_step, num_completions,"
                    " num_tokens, received_at, stored_path, batch_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        s.content_hash,
                        s.node,
                        s.policy_step,
                        s.train_step,
                        s.num_completions,
                        s.num_tokens,
                        at,
                        s.stored_path,
                        s.batch_key,
                    ),
                )
            except sqlite3.IntegrityError as e:
                raise DuplicateSubmission(f"submission {s.content_hash} is already recorded") from e
            self._verdict(s.node, cur.lastrowid, verdict, at, evidence)
            if verdict.accepted:
                self._db.execute(
                    "INSERT INTO credit(node, accepted_tokens, accepted_completions) VALUES (?, ?, ?) "
                    "ON CONFLICT(node) DO UPDATE SET accepted_tokens = accepted_tokens + excluded.accepted_tokens,"
                    " accepted_completions = accepted_completions + excluded.accepted_completions",
                    (s.node, s.num_tokens, s.num_completions),
                )
            return cur.lastrowid

    def record_rejection(self, node: str, reason: str, detail: str = "", at: float | None = None,
                         evidence: Evidence = Evidence.HARD) -> None:
        """A rejection with no stored submission (a replay, an unreadable file), with the strike its
        `evidence` carries and any automatic ban."""
        at = time.time() if at is None else at
        with self._transaction():
            self._touch(node, None, at)
            self._verdict(node, None, Verdict(False, reason, detail), at, evidence)

    def _verdict(self, node: str, submission_id: int | None, verdict: Verdict, at: float,
                 evidence: Evidence) -> None:
        if verdict.accepted != (verdict.reason == ACCEPTED):
            raise ValueError(f"verdict reason {verdict.reason!r} contradicts accepted={verdict.accepted}")
        strike = 0.0 if verdict.accepted else self.ban_policy.weight(evidence)
        self._db.execute(
            "INSERT INTO verdicts(submission, node, accepted, reason, detail, at, strike)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                submission_id,
                node,
                int(verdict.accepted),
                verdict.reason,
                verdict.detail[:MAX_DETAIL_CHARS],
                at,
                strike,
            ),
        )
        if strike == 0:
            return
        strikes, judged = self._window(node)
        if strikes >= self.ban_policy.strikes - 1e-9:
            why = f"automatic: {strikes:.3g} strikes in its last {judged} judged submissions, last {verdict.reason}"
            self._db.execute("INSERT OR IGNORE INTO bans(node, reason, at) VALUES (?, ?, ?)", (node, why, at))

    def _window(self, node: str) -> tuple[float, int]:
        """(strikes, judged submissions) over the node's last `window` judged submissions since its
        last unban; judged: accepted, or rejected with a strike."""
        strikes, judged = self._db.execute(
            "SELECT COALESCE(SUM(strike), 0), COUNT(*) FROM (SELECT v.strike FROM verdicts v"
            " JOIN nodes n ON n.public_key = v.node"
            " WHERE v.node = ? AND v.id > n.forgiven_verdict AND (v.accepted = 1 OR v.strike > 0)"
            " ORDER BY v.id DESC LIMIT ?)",
            (node, self.ban_policy.window),
        ).fetchone()
        return float(strikes), int(judged)

    def requeue(self, submission_ids: list[int], train_step: int) -> None:
        """Move accepted submissions to a later train step (the trainer took enough for this one)."""
        with self._transaction():
            self._db.executemany("UPDATE submissions SET train_step = ? WHERE id = ?",
                                 [(train_step, i) for i in submission_ids])

    def ban(self, node: str, reason: str, at: float | None = None) -> None:
        at = time.time() if at is None else at
        with self._transaction():
            self._touch(node, None, at)
            self._db.execute(
                "INSERT OR REPLACE INTO bans(node, reason, at) VALUES (?, ?, ?)", (node, reason, at)
            )

    def unban(self, node: str) -> None:
        """Lift a ban and forgive past strikes (the node starts over with an empty window)."""
        with self._transaction():
            self._db.execute("DELETE FROM bans WHERE node = ?", (node,))
            self._db.execute("UPDATE nodes SET forgiven_verdict = (SELECT COALESCE(MAX(id), 0) FROM verdicts)"
                             " WHERE public_key = ?", (node,))

    # ------------------------------------------------------------ reads

    def is_banned(self, node: str) -> bool:
        return bool(self._read("SELECT 1 FROM bans WHERE node = ?", (node,)))

    def ban_reason(self, node: str) -> str | None:
        rows = self._read("SELECT reason FROM bans WHERE node = ?", (node,))
        return rows[0][0] if rows else None

    def strikes(self, node: str) -> float:
        """Strikes within the node's ban window now."""
        with self._lock:
            return self._window(node)[0]

    def is_accepted(self, content_hash: str) -> bool:
        return bool(self._read("SELECT 1 FROM submissions s JOIN verdicts v ON v.submission = s.id"
                               " WHERE s.content_hash = ? AND v.accepted = 1", (content_hash,)))

    def is_duplicate(self, content_hash: str) -> bool:
        return bool(self._read("SELECT 1 FROM submissions WHERE content_hash = ?", (content_hash,)))

    def batch_holder(self, batch_key: str) -> str | None:
        """Content hash of the file recorded for this node:policy_step:batch_counter, if any."""
        rows = self._read("SELECT content_hash FROM submissions WHERE batch_key = ?", (batch_key,))
        return rows[0][0] if rows else None

    def note_batch_counter(self, node: str, policy_step: int, counter: int) -> None:
        """Remember that `node` used `counter` at `policy_step` (keeps the highest)."""
        with self._transaction():
            self._db.execute("INSERT INTO batch_counters VALUES (?, ?, ?) ON CONFLICT (node, policy_step) "
                             "DO UPDATE SET highest = max(highest, excluded.highest)", (node, policy_step, counter))

    def highest_batch_counter(self, node: str, policy_step: int) -> int:
        """The highest batch counter recorded for (node, policy step); 0 if none."""
        rows = self._read("SELECT highest FROM batch_counters WHERE node = ? AND policy_step = ?", (node, policy_step))
        return int(rows[0][0]) if rows else 0

    def credit_of(self, node: str) -> int:
        """Accepted completion tokens of a node."""
        rows = self._read("SELECT accepted_tokens FROM credit WHERE node = ?", (node,))
        return rows[0][0] if rows else 0

    def counts_by_reason(self) -> dict[str, int]:
        return dict(self._read("SELECT reason, COUNT(*) FROM verdicts GROUP BY reason ORDER BY reason"))

    def node_table(self) -> list[NodeRow]:
        rows = self._read(
            "SELECT n.public_key, n.peer_id,"
            " (SELECT COUNT(*) FROM verdicts v WHERE v.node = n.public_key AND v.accepted = 1),"
            " (SELECT COUNT(*) FROM verdicts v WHERE v.node = n.public_key AND v.accepted = 0),"
            " COALESCE(c.accepted_tokens, 0), n.last_seen, b.node IS NOT NULL"
            " FROM nodes n LEFT JOIN credit c ON c.node = n.public_key LEFT JOIN bans b ON b.node = n.public_key"
            " ORDER BY n.last_seen DESC"
        )
        return [
            NodeRow(pk, pid, acc, rej, tok, seen, bool(banned))
            for pk, pid, acc, rej, tok, seen, banned in rows
        ]

    def recent_verdicts(self, limit: int = 20) -> list[VerdictRow]:
        rows = self._read(
            "SELECT v.node, s.content_hash, v.accepted, v.reason, v.detail, v.at FROM verdicts v"
            " LEFT JOIN submissions s ON s.id = v.submission ORDER BY v.id DESC LIMIT ?",
            (limit,),
        )
        return [
            VerdictRow(node, h, bool(acc), reason, detail, at) for node, h, acc, reason, detail, at in rows
        ]

    def accepted_submission(self, content_hash: str) -> SubmissionRow | None:
        """The accepted submission of this file, if there is one (its verdict, asked for after a restart)."""
        rows = self._read(
            "SELECT s.id, s.content_hash, s.node, s.policy_step, s.train_step, s.num_completions, s.num_tokens,"
            " s.received_at, s.stored_path FROM submissions s JOIN verdicts v ON v.submission = s.id"
            " WHERE s.content_hash = ? AND v.accepted = 1",
            (content_hash,),
        )
        return SubmissionRow(*rows[0]) if rows else None

    def accepted_for_train_step(self, train_step: int) -> list[SubmissionRow]:
        """Accepted submissions queued for a train step, oldest first (the trainer's input)."""
        rows = self._read(
            "SELECT s.id, s.content_hash, s.node, s.policy_step, s.train_step, s.num_completions, s.num_tokens,"
            " s.received_at, s.stored_path FROM submissions s JOIN verdicts v ON v.submission = s.id"
            " WHERE s.train_step = ? AND v.accepted = 1 ORDER BY s.id",
            (train_step,),
        )
        return [SubmissionRow(*row) for row in rows]

    def integrity_ok(self) -> bool:
        return self._read("PRAGMA integrity_check")[0][0] == "ok"


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (the exception propagates)."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock):
        self.db = db
        self.lock = lock

    def __enter__(self) -> None:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        finally:
            self.lock.release()
