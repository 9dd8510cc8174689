"""The coordinator's ledger: nodes, submissions, verdicts, bans and credit in one SQLite file.

WAL mode with synchronous=FULL: every recorded verdict survives the process being killed at any
moment (and a power cut), and readers (dashboard) never block the writer. A submission and its
verdict, the node's strike count, credit and any automatic ban are written in ONE transaction,
so a crash can never leave a verdict without its credit or a strike without its ban. The ledger
does not decide anything: intake hands it verdicts; it only records, counts and bans after
`max_failures` consecutive rejected submissions (an accepted one resets the count). Safe to share
between threads: one connection behind a lock
(intake handlers and the trainer loop record from different threads).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

SCHEMA_VERSION = 1

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

_SCHEMA = """
CREATE TABLE nodes (
    public_key TEXT PRIMARY KEY,
    peer_id TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    strikes INTEGER NOT NULL DEFAULT 0          -- rejections since the last unban
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
    at REAL NOT NULL
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

ACCEPTED = "accepted"
MAX_DETAIL_CHARS = 2000


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
    def __init__(self, path: str | Path, max_failures: int = 3):
        if max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {max_failures}")
        self.path = Path(path)
        self.max_failures = max_failures
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

    def record_submission(self, submission: Submission, verdict: Verdict, at: float | None = None) -> int:
        """Store a submission with its verdict, credit/strike and any automatic ban, atomically.
        Returns the submission id; raises DuplicateSubmission (recording nothing) on a replay."""
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
            self._verdict(s.node, cur.lastrowid, verdict, at)
            if verdict.accepted:
                # strikes count consecutive failures: a node that delivers again starts over
                self._db.execute("UPDATE nodes SET strikes = 0 WHERE public_key = ?", (s.node,))
                self._db.execute(
                    "INSERT INTO credit(node, accepted_tokens, accepted_completions) VALUES (?, ?, ?) "
                    "ON CONFLICT(node) DO UPDATE SET accepted_tokens = accepted_tokens + excluded.accepted_tokens,"
                    " accepted_completions = accepted_completions + excluded.accepted_completions",
                    (s.node, s.num_tokens, s.num_completions),
                )
            return cur.lastrowid

    def record_rejection(self, node: str, reason: str, detail: str = "", at: float | None = None,
                         strike: bool = True) -> None:
        """A rejection with no stored submission (a replay, an unreadable file). It counts as a strike
        unless `strike` is False (failures that do not prove the key's owner misbehaved)."""
        at = time.time() if at is None else at
        with self._transaction():
            self._touch(node, None, at)
            self._verdict(node, None, Verdict(False, reason, detail), at, strike=strike)

    def _verdict(self, node: str, submission_id: int | None, verdict: Verdict, at: float,
                 strike: bool = True) -> None:
        if verdict.accepted != (verdict.reason == ACCEPTED):
            raise ValueError(f"verdict reason {verdict.reason!r} contradicts accepted={verdict.accepted}")
        self._db.execute(
            "INSERT INTO verdicts(submission, node, accepted, reason, detail, at) VALUES (?, ?, ?, ?, ?, ?)",
            (
                submission_id,
                node,
                int(verdict.accepted),
                verdict.reason,
                verdict.detail[:MAX_DETAIL_CHARS],
                at,
            ),
        )
        if verdict.accepted or not strike:
            return
        strikes = self._db.execute(
            "UPDATE nodes SET strikes = strikes + 1 WHERE public_key = ? RETURNING strikes", (node,)
        ).fetchone()[0]
        if strikes >= self.max_failures:
            self._db.execute(
                "INSERT OR IGNORE INTO bans(node, reason, at) VALUES (?, ?, ?)",
                (node, f"automatic: {strikes} failed submissions, last {verdict.reason}", at),
            )

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
        """Lift a ban and forgive past strikes (the node starts over with max_failures)."""
        with self._transaction():
            self._db.execute("DELETE FROM bans WHERE node = ?", (node,))
            self._db.execute("UPDATE nodes SET strikes = 0 WHERE public_key = ?", (node,))

    # ------------------------------------------------------------ reads

    def is_banned(self, node: str) -> bool:
        return bool(self._read("SELECT 1 FROM bans WHERE node = ?", (node,)))

    def ban_reason(self, node: str) -> str | None:
        rows = self._read("SELECT reason FROM bans WHERE node = ?", (node,))
        return rows[0][0] if rows else None

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
