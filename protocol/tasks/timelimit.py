"""Grading under a time limit: a verifier that may be slow on hostile text (sympy) runs in a helper
process, which is killed when one completion takes longer than the limit; that completion then
scores 0, and so does one whose grading fails or kills the helper (a memory cap is set in it).

Node and coordinator both grade through `grade_with_timeout` with the run's `grade_timeout_s`, so a
completion too slow to grade is the node's zero reward, which the coordinator recomputes as zero
instead of stalling on it. Verifiers that are linear-time by construction (`Task.needs_time_limit`
False, e.g. arithmetic) run in this process: no helper, no IPC.

The helper is a fresh interpreter (no fork of a process holding threads, torch or a DHT), started
once per process and again after a timeout; the task is sent to it pickled when it changes. What this
module does not know: what a task grades or how rewards are combined (`config.completion_reward`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import select
import subprocess
import sys
import threading
import time

from .base import Problem, Task

logger = logging.getLogger(__name__)

DEFAULT_GRADE_TIMEOUT_S = 5.0
HELPER_MEMORY_BYTES = 2 << 30  # address-space cap of the helper: a sympy blow-up dies there, scoring 0
STARTUP_TIMEOUT_S = 120.0  # imports in a fresh interpreter, on a busy machine


def grade_with_timeout(task: Task, problem: Problem, completion_text: str,
                       timeout_s: float = DEFAULT_GRADE_TIMEOUT_S) -> float:
    """`task.score(problem, completion_text)`, or 0.0 when it takes longer than `timeout_s` seconds,
    raises, or dies. Should the helper itself fail to start, the completion is graded in this process."""
    if not task.needs_time_limit:
        return task.score(problem, completion_text)
    return _helper.score(task, problem, completion_text, timeout_s)


class GraderHelper:
    """One helper process and the pipe to it; calls from several threads take turns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process = None
        self._conn = None
        self._task: Task | None = None
        self._task_digest: bytes | None = None
        self.timeouts = 0  # completions scored 0 for taking too long (or killing the helper)

    def score(self, task: Task, problem: Problem, text: str, timeout_s: float) -> float:
        with self._lock:
            try:
                self._ensure_started()
                self._send_task(task)
            except (EOFError, OSError, TimeoutError) as e:
                # not the completion's fault: grade it here, as the node would, only without the limit
                logger.warning("the grading helper is not available (%s): grading in this process", e)
                self._stop()
                return task.score(problem, text)
            try:
                self._conn.send(("grade", (problem, text)))
                if not self._conn.poll(timeout_s):
                    self.timeouts += 1
                    logger.warning("grading a completion of problem %s took over %.1f s: scored 0", problem.index,
                                   timeout_s)
                    self._stop()
                    return 0.0
                kind, value = self._conn.recv()
            except (EOFError, OSError) as e:  # the helper died mid-grading (memory cap, signal)
                self.timeouts += 1
                logger.warning("the grading helper died (%s): completion of problem %s scored 0", e, problem.index)
                self._stop()
                return 0.0
        if kind != "score":
            logger.warning("grading a completion of problem %s failed (%s): scored 0", problem.index, value)
            return 0.0
        return value

    def _send_task(self, task: Task) -> None:
        """Pickle a task only when it is another object than last time (a node builds one per batch),
        and send it only when its contents changed."""
        if task is self._task:
            return
        blob = pickle.dumps(task)
        digest = hashlib.sha256(blob).digest()
        if digest != self._task_digest:
            self._conn.send(("task", blob))
            self._expect("task", STARTUP_TIMEOUT_S)
            self._task_digest = digest
        self._task = task

    def _ensure_started(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        self._stop()
        # a fresh interpreter running this module (not multiprocessing's spawn, which re-runs the
        # parent's main script), on the parent's import path so that pickled tasks resolve
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._process = subprocess.Popen([sys.executable, "-c", f"from {__name__} import _serve; _serve()"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env)
        self._conn = _Pipe(self._process.stdout, self._process.stdin)
        self._expect("ready", STARTUP_TIMEOUT_S)

    def _expect(self, what: str, timeout_s: float) -> None:
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"the grading helper did not confirm {what!r} within {timeout_s:.0f} s")
        kind, value = self._conn.recv()
        if kind != what:
            raise OSError(f"the grading helper answered {kind!r} ({value}) instead of {what!r}")

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(5)
            self._process.stdin.close()
            self._process.stdout.close()
        self._process = self._conn = self._task = self._task_digest = None

    def close(self) -> None:
        with self._lock:
            self._stop()


class _Pipe:
    """Length-prefixed pickles over a pair of pipes; `poll` waits for the next message to begin."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer

    def send(self, message) -> None:
        blob = pickle.dumps(message)
        view = memoryview(len(blob).to_bytes(8, "little") + blob)
        while view:  # an unbuffered pipe may take a long message in pieces
            view = view[self.writer.write(view) :]

    def poll(self, timeout_s: float) -> bool:
        return bool(select.select([self.reader], [], [], timeout_s)[0])

    def recv(self):
        size = int.from_bytes(self._read(8), "little")
        return pickle.loads(self._read(size))

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:  # unbuffered pipes (poll must see what recv has not read) return pieces
            piece = self.reader.read(n - len(data))
            if not piece:
                raise EOFError("the other end closed the pipe")
            data += piece
        return data


def _serve() -> None:
    """The helper's loop: ("task", pickled task) -> ("task", None); ("grade", (problem, text)) ->
    ("score", float) or ("error", words). Messages only on the pipe it was given as stdout."""
    import resource

    # messages go to the parent on a private copy of fd 1; fd 1 itself (a verifier's print) to stderr
    conn = _Pipe(open(0, "rb", buffering=0, closefd=False), open(os.dup(1), "wb", buffering=0))  # noqa: SIM115
    os.dup2(2, 1)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (HELPER_MEMORY_BYTES, HELPER_MEMORY_BYTES))
    except (ValueError, OSError):  # a lower hard limit already: keep it
        pass
    from .math_answers import warm_up

    warm_up()  # math-verify's imports and first parse (~2 s) now: they are not a grading's time

    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()

    conn.send(("ready", None))
    task = None
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if kind == "task":
                task = pickle.loads(payload)
                conn.send(("task", None))
            else:
                problem, text = payload
                conn.send(("score", float(task.score(problem, text))))
        except Exception as e:  # noqa: BLE001 - any failure of a verifier is a zero, reported in words
            conn.send(("error", f"{type(e).__name__}: {e}"[:500]))


def _exit_with_parent(parent: int) -> None:
    """A helper stuck in a grading does not read its pipe: leave when the parent is gone (SIGKILL)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


_helper = GraderHelper()
