"""What the node is doing, in one object: the work loop writes it, the TUI and status.json read it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class NodeStatus:
    peer_id: str = ""
    run_id: str = ""
    coordinator: str = ""
    # starting | joining | waiting | fetching | generating | submitting (pipelined: waiting for room in the
    # outbox) | paused | error
    state: str = "starting"
    error: str = ""  # plain words and what to do, while state == "error"
    peers: int = 0
    reachability: str = "unknown"
    collect_step: int | None = None  # the run's train step being collected (RunInfo.collect_step)
    policy_step: int | None = None  # the policy the engine runs
    download_done: int = 0
    download_total: int = 0
    download_rate: float = 0.0
    engine: str = ""
    device: str = ""
    tokens_per_s: float = 0.0
    generate_s: float = 0.0  # seconds inside the engine's generate since the node started
    first_generate_at: float | None = None  # wall clock (time.time) when the first batch began
    last_generated_at: float | None = None  # ... and when the newest one ended: duty cycle = generate_s / span
    # where the rest of that span went: the loop waiting for a policy (fetch and verify, then the copy into
    # the engine), and waiting for verdicts (pipelined: for room in the pipeline; else: for each verdict)
    policy_wait_s: float = 0.0
    verdict_wait_s: float = 0.0
    submitted: int = 0
    accepted: int = 0
    rejected: int = 0
    pending: int = 0  # rollout files waiting in the outbox
    expired: int = 0  # rollout files that went stale before the coordinator took them
    last_rejection: str = ""
    credit: int = 0
    last_reward: float | None = None
    restarts: int = 0
    paused: bool = False
    swarm: dict[str, int] = field(default_factory=dict)  # Swarm.counters(): records refused, requests served...
    updated_at: float = field(default_factory=time.time)

    @property
    def staleness(self) -> int | None:
        if self.collect_step is None or self.policy_step is None:
            return None
        return self.collect_step - self.policy_step

    def busy(self) -> tuple[float, float, float] | None:
        """Shares of the time since the first batch began: generating, waiting for a policy, waiting for
        verdicts (the rest: reading the run's state, scoring, writing, paused). None before a batch ended."""
        if self.first_generate_at is None or self.last_generated_at is None:
            return None
        span = max(time.time() - self.first_generate_at, 1e-9)
        return self.generate_s / span, self.policy_wait_s / span, self.verdict_wait_s / span

    def write(self, path: Path) -> None:
        self.updated_at = time.time()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self) | {"staleness": self.staleness}))
        os.replace(tmp, path)

    @staticmethod
    def read(path: Path) -> dict | None:
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None
