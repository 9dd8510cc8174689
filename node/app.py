"""`intellect-node join`: wire identity, swarm, fetcher and worker together and keep them running.

The work loop runs in a thread and restarts itself after recoverable failures (see `worker`); this
module adds the heartbeat the coordinator's dashboard shows, status.json for supervisors (the demo),
and a clean shutdown. The screen is `tui`; `--headless` logs instead.
"""

from __future__ import annotations

import json
import logging
import threading
import time

from intellect.node import known_peers
from intellect.node.config import NodeConfig
from intellect.node.status import NodeStatus
from intellect.node.worker import Worker
from intellect.protocol.identity import load_identity
from intellect.protocol.messages import Heartbeat, encode_body
from intellect.protocol.swarm import SwarmError
from intellect.protocol.swarm.keys import peers_key
from intellect.protocol.wire import MessageKind, seal

logger = logging.getLogger(__name__)


class NodeApp:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.identity, created = load_identity(config.state_dir, create=True)
        self.status = NodeStatus(peer_id=self.identity.peer_id, run_id=config.run_id)
        self._restore_totals(config.state_dir / "verdicts.jsonl")
        self.status_path = config.state_dir / "status.json"
        self.stop = threading.Event()
        self.swarm = None
        self.fetcher = None
        self.worker: Worker | None = None
        self._threads: list[threading.Thread] = []
        if created:
            logger.info("created a new node key at %s", config.state_dir)

    def start(self) -> None:
        """Join the swarm (raises SwarmJoinError in plain words) and start the work loop."""
        from intellect.node.fetch import ShardFetcher

        self.status.state = "joining"
        self._write_status()
        self.swarm = known_peers.join(self.config.swarm, self.identity, self.config.run_id,
                                      self.config.coordinator_public_key, self.config.state_dir)
        self.fetcher = ShardFetcher(self.swarm, self.config.swarm, self.config.state_dir / "cache",
                                    self.config.coordinator_public_key, progress=self._on_progress)
        self.worker = Worker(self.config, self.identity, self.swarm, self.fetcher, self.status)
        self._spawn(self.worker.run, "work-loop")
        self._spawn(self._housekeeping, "housekeeping")

    def _restore_totals(self, verdict_log) -> None:
        """Carry submitted / accepted / rejected / credit over from earlier sessions of this key: the
        volunteer's contribution must not read 0 after a restart. The worker appends one line per verdict."""
        try:
            lines = verdict_log.read_text().splitlines()
        except FileNotFoundError:
            return
        except OSError as e:
            logger.warning("cannot read %s: %s", verdict_log, e)
            return
        s = self.status
        for line in lines:
            try:
                v = json.loads(line)
                accepted, credit = bool(v["accepted"]), int(v.get("credit_tokens", 0))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
            s.submitted += 1
            s.accepted += accepted
            s.rejected += not accepted
            s.credit += credit if accepted else 0

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _on_progress(self, p) -> None:
        self.status.download_done, self.status.download_total = p.bytes_done, p.bytes_total
        self.status.download_rate = p.rate_bytes_per_s

    def _housekeeping(self) -> None:
        """status.json every second; heartbeat and reachability now and then."""
        next_beat = 0.0
        checked = False
        while not self.stop.wait(self.config.status_interval_s):
            self._write_status()
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + 15.0
            try:
                self.status.peers = len(self.swarm.peers())
                if not checked and self.status.peers and hasattr(self.swarm, "check_reachability"):
                    r = self.swarm.check_reachability(timeout=10.0)
                    self.status.reachability = r.line
                    checked = r.reachable is not None
                self._heartbeat()
                known_peers.save(self.swarm, self.config.state_dir)
            except (SwarmError, TimeoutError, OSError) as e:
                logger.warning("housekeeping: %s", e)

    def _heartbeat(self) -> None:
        s = self.status
        body = Heartbeat(policy_step=s.policy_step, engine=s.engine if s.engine in ("torch", "vllm")
                         else "torch", device=s.device[:64], tokens_per_s=float(s.tokens_per_s), paused=s.paused)
        envelope = seal(self.identity, MessageKind.HEARTBEAT, self.config.run_id, encode_body(body))
        self.swarm.publish(peers_key(), envelope, ttl_s=60.0)

    def _write_status(self) -> None:
        if self.swarm is not None:
            self.status.swarm = self.swarm.counters()
        try:
            self.status.write(self.status_path)
        except OSError as e:
            logger.warning("cannot write %s: %s", self.status_path, e)

    def pause(self, paused: bool) -> None:
        if self.worker is not None:
            self.worker.pause(paused)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the work loop ends (max_batches reached, or stopped); True if it ended."""
        if self.worker is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._threads[0].is_alive():
            if deadline is not None and time.monotonic() > deadline:
                return False
            self._threads[0].join(0.2)
        return True

    def close(self, grace_s: float = 30.0) -> None:
        """Stop: the work loop finishes its current step (a batch being generated is kept in the outbox)
        before the engine goes. Waiting for it matters: a daemon thread still inside torch when Python
        exits aborts the process ("terminate called without an active exception", exit 134). After
        `grace_s` we go on anyway; by then the loop waits on the network, which is safe to abandon."""
        self.stop.set()
        if self.worker is not None:
            self.worker.stop.set()  # no new turn, no restart backoff
            self.worker.resume.set()  # leave the pause wait
            if not self.wait(grace_s):
                logger.warning("the work loop did not stop within %.0f s; exiting anyway", grace_s)
            self.worker.close()
        self._write_status()
        if self.fetcher is not None:
            self.fetcher.close()
        if self.swarm is not None:
            self.swarm.close()
