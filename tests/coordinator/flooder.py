"""A flooding peer, for tests/test_flood.py: one key of its own joins the run's swarm and calls the
coordinator's submit handler as fast as the coordinator answers, from several threads, for a set time.
Each call is one of three kinds of garbage, in turn: random bytes (no envelope at all), a submission
envelope it signed around a junk body, and a signed, well-formed header around a junk rollout file.
It writes {"calls", "seconds", "outcomes": {verdict reason or refusal code: count}} to --result.

  python flooder.py --run-file RUN.toml --seconds 30 --threads 8 --result flood.json [--started FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
import time
import tomllib
from collections import Counter
from pathlib import Path

from intellect.protocol.identity import Identity
from intellect.protocol.messages import SUBMIT_RPC, SubmissionHeader, Verdict, decode_body, encode_submission
from intellect.protocol.swarm import RemoteError, SwarmConfig, SwarmError, setup_swarm
from intellect.protocol.wire import MessageKind, WireRejected, open_envelope, seal

FLOODER = Identity.from_seed(b"flooder")


def garbage(i: int, run_id: str) -> bytes:
    junk = os.urandom(64 + i % 2000)
    if i % 3 == 0:
        return junk
    if i % 3 == 1:
        return seal(FLOODER, MessageKind.SUBMISSION, run_id, junk)
    header = SubmissionHeader(policy_step=0, batch_counter=i, num_completions=4, num_tokens=64,
                              file_sha256=hashlib.sha256(junk).hexdigest(), file_size=len(junk))
    return seal(FLOODER, MessageKind.SUBMISSION, run_id, encode_submission(header, junk))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-file", required=True)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--result", required=True)
    p.add_argument("--started", help="a file written when the flood begins")
    args = p.parse_args()
    run = tomllib.loads(Path(args.run_file).read_text())
    coordinator = bytes.fromhex(run["coordinator_key"])
    swarm = setup_swarm(SwarmConfig(host="127.0.0.1", bootstrap=run["bootstrap"]), FLOODER, run["run_id"], coordinator)
    outcomes: Counter = Counter()
    lock = threading.Lock()
    calls = iter(range(1 << 62))
    start = time.monotonic()
    deadline = start + args.seconds

    def flood() -> None:
        while time.monotonic() < deadline:
            i = next(calls)
            try:
                answer = swarm.call(coordinator, SUBMIT_RPC, garbage(i, run["run_id"]), timeout=30)
                verdict = decode_body(Verdict, open_envelope(answer, run_id=run["run_id"],
                                                             expected_sender=coordinator).body)
                outcome = verdict.reason
            except RemoteError as e:
                outcome = f"refused:{e.code}"
            except (SwarmError, TimeoutError, WireRejected) as e:
                outcome = f"error:{type(e).__name__}"
            with lock:
                outcomes[outcome] += 1

    if args.started:
        Path(args.started).write_text(str(time.time()))
    threads = [threading.Thread(target=flood, daemon=True) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - start
    Path(args.result).write_text(json.dumps({"calls": outcomes.total(), "seconds": round(seconds, 2),
                                             "outcomes": dict(outcomes)}))
    swarm.close()


if __name__ == "__main__":
    main()
