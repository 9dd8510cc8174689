"""`intellect-node coordinator`: start the run, print how to join, and show the dashboard (or JSON
lines with --headless) while the async policy loop runs in a thread."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

from rich.console import Console
from rich.live import Live

from intellect.coordinator.config import CoordinatorConfig
from intellect.coordinator.service import Coordinator, FatalError
from intellect.protocol.tasks import TaskDataError


def write_run_file(coordinator: Coordinator, path: Path) -> None:
    """What a node needs to join, as TOML: `intellect-node join --run-file PATH`."""
    addrs = coordinator.swarm.visible_addrs()
    lines = [f'run_id = "{coordinator.run_id}"', f'coordinator_key = "{coordinator.identity.public_key_hex}"',
             "bootstrap = [" + ", ".join(f'"{a}"' for a in addrs) + "]",
             f'backend = "{coordinator.config.swarm.backend}"']
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def start_coordinator(config: CoordinatorConfig) -> Coordinator:
    coordinator = Coordinator(config)
    # the effective settings, for `intellect-node verify` and `report` (and for humans)
    (config.state_dir / "config.json").write_text(config.model_dump_json(indent=2))
    coordinator.start_swarm()
    write_run_file(coordinator, config.state_dir / "run.toml")
    if config.metrics_port is not None:
        from intellect.coordinator.dashboard import serve_metrics

        serve_metrics(coordinator, config.metrics_port)
    return coordinator


def run_coordinator(config: CoordinatorConfig, headless: bool, console: Console) -> None:
    """The coordinator in this process; under torchrun (WORLD_SIZE > 1) rank 0 runs it and the other
    ranks train their FSDP2 shards of its model (`follow_coordinator`)."""
    from intellect.coordinator.service import follow_coordinator
    from intellect.coordinator.trainer import distributed
    from intellect.protocol.swarm import SwarmJoinError

    if distributed.init_from_env() and distributed.rank_and_world()[0] > 0:
        follow_coordinator(config)
        return

    try:
        coordinator = start_coordinator(config)
    except SwarmJoinError as e:
        console.print(f"[bold red]error:[/] could not start the swarm: {e}", soft_wrap=True)
        raise SystemExit(1) from None
    except (TaskDataError, ImportError, ValueError, OSError) as e:  # data, modules, model, config, disk
        console.print(f"[bold red]error:[/] the coordinator cannot start: {e}", soft_wrap=True, highlight=False)
        raise SystemExit(1) from None
    # soft_wrap: rich would otherwise break the multiaddrs into lines at the console width (80 in a log
    # file), and the join line is meant to be copied
    console.print(f"run {coordinator.run_id}\nnodes join with:\n  {coordinator.join_command()}\n"
                  f"  (or: intellect-node join --run-file {config.state_dir / 'run.toml'})", soft_wrap=True,
                  highlight=False)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    printer = (lambda m: print(json.dumps(m), flush=True)) if headless else None
    fatal: list[str] = []

    def policy_loop() -> None:
        try:
            coordinator.run(on_step=printer)
        except FatalError as e:
            fatal.append(str(e))
        except BaseException as e:  # run() survives any failure of a turn; this is a bug in run itself
            fatal.append(f"the policy loop stopped: {type(e).__name__}: {e}")
            raise
        finally:
            done.set()  # the headless wait and the dashboard end with the loop, whatever ended it

    loop = threading.Thread(target=policy_loop, name="policy-loop", daemon=True)
    loop.start()
    try:
        if headless:
            done.wait()
        else:
            show_dashboard(coordinator, done)
    except KeyboardInterrupt:
        pass
    finally:
        coordinator.stop.set()
        loop.join(timeout=60)
        coordinator.close()
    if fatal:
        console.print(f"[bold red]error:[/] {fatal[0]}", soft_wrap=True, highlight=False)
        raise SystemExit(1)


def show_dashboard(coordinator: Coordinator, done: threading.Event, extra=list) -> None:
    from intellect.coordinator.dashboard import heartbeats, render

    beats: dict = {}
    beat_tick = 0
    with Live(render(coordinator, beats, extra()), refresh_per_second=2, screen=True) as live:
        while not done.wait(0.5):
            beat_tick += 1
            if beat_tick % 10 == 1:
                beats = heartbeats(coordinator)
            live.update(render(coordinator, beats, extra()))
