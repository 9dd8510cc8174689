"""The volunteer's status screen (rich): identity, run, peers, policy, download, throughput,
verdicts and credit. Keys: p pause/resume generation, q quit cleanly.

It only reads `NodeStatus`; key presses call back into the app.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from intellect.node.status import NodeStatus

STATE_STYLE = {"error": "bold red", "paused": "yellow", "generating": "green", "submitting": "cyan",
               "fetching": "blue", "waiting": "magenta"}


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def render(s: NodeStatus) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", justify="right")
    grid.add_column()
    grid.add_row("node", f"{s.peer_id}")
    grid.add_row("run", f"{s.run_id}   coordinator {s.coordinator or '?'}")
    grid.add_row("peers", f"{s.peers}   reachability: {s.reachability}")
    stale = "" if s.staleness is None else f"   staleness {s.staleness}"
    grid.add_row("policy", f"step {s.policy_step if s.policy_step is not None else '-'}   "
                           f"collecting step {s.collect_step if s.collect_step is not None else '-'}{stale}")
    if s.download_total:
        bar = ProgressBar(total=s.download_total, completed=s.download_done, width=30)
        grid.add_row("download", Group(bar, Text(f"{_mb(s.download_done)} / {_mb(s.download_total)} at "
                                                 f"{_mb(s.download_rate)}/s")))
    grid.add_row("engine", f"{s.engine or '-'} on {s.device or '-'}   {s.tokens_per_s:,.1f} tokens/s")
    if (busy := s.busy()) is not None:  # does the engine idle? (pipelining and prefetching keep it busy)
        grid.add_row("busy", f"generating {busy[0]:.0%}   waiting for a policy {busy[1]:.0%}   "
                             f"for verdicts {busy[2]:.0%}")
    grid.add_row("rollouts", f"submitted {s.submitted}   [green]accepted {s.accepted}[/]   "
                             f"[red]rejected {s.rejected}[/]   pending {s.pending}   expired {s.expired}")
    if s.last_rejection:
        grid.add_row("last rejection", Text(s.last_rejection, style="red"))
    reward = "-" if s.last_reward is None else f"{s.last_reward:.3f}"
    grid.add_row("credit", f"{s.credit:,} tokens accepted   last reward {reward}")
    # a pause takes effect between batches: until then say so, or the key press looks ignored
    pausing = s.paused and s.state not in ("paused", "error", "stopping", "stopped")
    label, look = ("PAUSING (finishing this batch)", "paused") if pausing else (s.state.upper(), s.state)
    state = Text(label, style=STATE_STYLE.get(look, "white"))
    body = [grid]
    if s.error:
        body.append(Text(f"\n{s.error}", style="bold red"))
    body.append(Text(f"\n[p] {'resume' if s.paused else 'pause'}   [q] quit", style="dim"))
    return Panel(Group(*body), title=Text.assemble("intellect-node · ", state), border_style="cyan")


def run_tui(status: NodeStatus, on_pause: Callable[[bool], None], should_stop: Callable[[], bool]) -> None:
    """Draw until q (or should_stop()); p toggles pause. Needs a terminal on stdin."""
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    quit_pressed = False
    try:
        with Live(render(status), refresh_per_second=4, screen=True) as live:
            while not quit_pressed and not should_stop():
                ready, _, _ = select.select([fd], [], [], 0.25)
                # os.read, not sys.stdin.read: the text layer would buffer a second key out of select's sight
                for key in os.read(fd, 64).decode(errors="ignore").lower() if ready else "":
                    if key == "q":
                        quit_pressed = True
                        status.state = "stopping"
                        break
                    if key == "p":
                        on_pause(not status.paused)
                live.update(render(status))
                time.sleep(0.05)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)
    if quit_pressed:
        live.console.print("stopping: finishing the current batch ...")
