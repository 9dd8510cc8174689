"""The coordinator's live screen (rich) and its Prometheus /metrics endpoint (prometheus-client).

Both only read: the coordinator's history and ledger, and the nodes' signed heartbeats.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from intellect.protocol.messages import Heartbeat, decode_body
from intellect.protocol.swarm.keys import peers_key
from intellect.protocol.wire import WireRejected

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    values = values[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(BARS[min(len(BARS) - 1, int((v - lo) / span * (len(BARS) - 1)))] for v in values)


def heartbeats(coordinator) -> dict[str, Heartbeat]:
    """Latest heartbeat per node public key (hex), from the DHT."""
    out = {}
    if coordinator.swarm is None:
        return out
    for envelope in coordinator.swarm.read(peers_key()):
        try:
            out[envelope.sender.hex()] = decode_body(Heartbeat, envelope.body)
        except WireRejected:
            continue
    return out


def heldout_row(coordinator) -> str:
    """Greedy held-out accuracy over the evaluated policies, the last one's mean@k, and the first for comparison."""
    evals = sorted(coordinator.evals, key=lambda m: m["policy_step"])
    running = coordinator.evaluator.running if coordinator.evaluator is not None else None
    busy = f"   evaluating policy {running}" if running is not None else ""
    if not evals:
        return "-" + busy
    first, last = evals[0], evals[-1]
    greedy = [m["heldout_greedy"] for m in evals]
    return (f"{sparkline(greedy)}  greedy {last['heldout_greedy']:.3f}   mean@{last['k']} "
            f"{last['heldout_mean_at_k']:.3f}   (policy {last['policy_step']}; policy {first['policy_step']}: "
            f"greedy {first['heldout_greedy']:.3f}){busy}")


def render(coordinator, beats: dict[str, Heartbeat], extra_lines: list[Text] = ()) -> Group:
    c = coordinator
    h = c.history
    last = h[-1] if h else {}
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold", justify="right")
    head.add_column()
    head.add_row("run", f"{c.run_id}   coordinator {c.identity.peer_id}")
    waiting = len(c.ledger.accepted_for_train_step(c.collect_step))
    going_out = f" (publishing; {c.published_step} out)" if c.published_step < c.latest_policy_step else ""
    head.add_row("policy", f"step {c.latest_policy_step}{going_out}   collecting step {c.collect_step}: "
                           f"{waiting}/{c.config.batches_per_step} batches   last step {last.get('step_s', 0):.1f} s   "
                           f"async level {c.config.async_level}")
    rewards = [m["reward"] for m in h]
    lengths = [m["length"] for m in h]
    head.add_row("reward", f"{sparkline(rewards)}  {rewards[-1]:.3f}" if rewards else "-")
    head.add_row("length", f"{sparkline(lengths)}  {lengths[-1]:.1f}" if lengths else "-")
    if c.evaluator is not None:
        head.add_row("held-out", heldout_row(c))
    if last:
        head.add_row("trainer", f"{last.get('tokens_per_s', 0):,.0f} tokens/s   loss {last.get('loss', 0):+.4f}   "
                                f"clip {last.get('clip_ratio', 0):.3f}   grad norm {last.get('grad_norm', 0):.3f}")
    sent = c.publisher.bytes_sent if c.publisher is not None else 0
    head.add_row("shards", f"{sent / 1e6:,.1f} MB served by the origin")
    counts = c.intake.counts_by_reason()
    head.add_row("verdicts", "   ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-")
    if c.last_error:  # the policy loop failed a turn and retries: say why until a turn succeeds
        head.add_row("[red]error[/]", Text(f"{c.last_error} (retrying; {c.loop_errors} failed turns)", style="red"))
    publishing = c.publishing
    if publishing is not None and publishing.last_error:  # the publishing thread retries a step: say why
        head.add_row("[red]publish[/]", Text(f"{publishing.last_error} (retrying; {publishing.num_failures} failed "
                                             "tries)", style="red"))

    nodes = Table(title="nodes", expand=True)
    for col in ("peer id", "engine", "state", "tokens/s", "policy", "accepted", "rejected", "credit", "last seen",
                "banned"):
        nodes.add_column(col)
    now = time.time()
    for row in c.ledger.node_table():
        if row.public_key == "unknown":
            continue
        beat = beats.get(row.public_key)
        # engine and state as the node says in its last heartbeat: shown, never trusted
        nodes.add_row(row.peer_id or row.public_key[:12], f"{beat.engine} on {beat.device}" if beat else "-",
                      ("paused" if beat.paused else "working") if beat else "-",
                      f"{beat.tokens_per_s:,.1f}" if beat else "-",
                      str(beat.policy_step) if beat and beat.policy_step is not None else "-",
                      str(row.accepted), str(row.rejected), f"{row.tokens:,}", f"{now - row.last_seen:,.0f} s ago",
                      "[red]yes[/]" if row.banned else "no")
    return Group(Panel(head, title="intellect-node coordinator", border_style="cyan"), nodes, *extra_lines)


class _RunCollector:
    """The run's numbers, read fresh from the coordinator at every scrape."""

    def __init__(self, coordinator) -> None:
        self.coordinator = coordinator

    def collect(self):
        c = self.coordinator
        last = c.history[-1] if c.history else {}
        yield GaugeMetricFamily("intellect_collect_step", "The train step newly accepted rollouts are queued for.",
                                value=c.collect_step)
        yield GaugeMetricFamily("intellect_latest_policy_step", "The newest published policy step.",
                                value=c.published_step)
        for name, key, what in (
            ("intellect_reward", "reward", "Mean reward of the last train step's completions."),
            ("intellect_completion_length", "length", "Mean completion length (tokens) of the last train step."),
            ("intellect_step_seconds", "step_s", "Seconds the last train step took."),
            ("intellect_trainer_tokens_per_second", "tokens_per_s", "Trainer throughput in the last train step."),
        ):
            yield GaugeMetricFamily(name, what, value=float(last.get(key, 0.0)))
        evals = sorted(c.evals, key=lambda m: m["policy_step"])
        if evals:  # absent until the first held-out evaluation is in (eval.every > 0)
            last_eval = evals[-1]
            for name, key, what in (
                ("intellect_heldout_greedy", "heldout_greedy", "Held-out greedy accuracy, newest evaluated policy."),
                ("intellect_heldout_mean_at_k", "heldout_mean_at_k", "Held-out mean@k, newest evaluated policy."),
                ("intellect_heldout_policy_step", "policy_step", "The policy step the held-out scores are of."),
            ):
                yield GaugeMetricFamily(name, what, value=float(last_eval[key]))
        verdicts = CounterMetricFamily("intellect_verdicts", "Submissions judged, by verdict reason "
                                       "('accepted' or why one was rejected).", labels=["reason"])
        for reason, count in sorted(c.intake.counts_by_reason().items()):
            verdicts.add_metric([reason], count)
        yield verdicts
        yield CounterMetricFamily("intellect_loop_errors", "Failed turns of the policy loop (it retries after each).",
                                  value=c.loop_errors)
        if c.swarm is not None:
            events = CounterMetricFamily("intellect_swarm_events", "The coordinator's swarm: records published, "
                                         "DHT records refused (dht_records_refused), requests served or refused.",
                                         labels=["event"])
            for event, count in sorted(c.swarm.counters().items()):
                events.add_metric([event], count)
            yield events
        sent = c.publisher.bytes_sent if c.publisher is not None else 0
        yield CounterMetricFamily("intellect_origin_bytes_sent", "Checkpoint shard bytes the coordinator served "
                                  "(peers serve the rest).", value=sent)


def metrics_registry(coordinator) -> CollectorRegistry:
    """The run's metrics plus the process's own (memory, CPU, open files, GC), in a registry of its own."""
    registry = CollectorRegistry()
    registry.register(_RunCollector(coordinator))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def serve_metrics(coordinator, port: int):
    """Prometheus text format at http://127.0.0.1:PORT/metrics, served by prometheus-client in a daemon
    thread. Returns the server (`server_address` has the port when PORT is 0)."""
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=metrics_registry(coordinator))
    return server
