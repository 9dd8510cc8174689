"""The `intellect-node` command line. Thin: parses arguments and hands off; heavy imports
(torch, hivemind) happen inside the commands that need them so `--help` stays fast."""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from intellect.protocol.identity import (
    IdentityError,
    default_state_dir,
    export_key,
    import_key,
    key_path,
    load_identity,
    new_identity,
)


def _wait_passively() -> None:
    """OpenMP threads spin while they wait for work unless told otherwise; beside other busy torch
    threads or processes the spinning takes the cores the work needs (two processes on 2 cores: 1.8x to
    3x slower spinning than waiting passively, bench/omp_wait.py). A lone node keeps spinning, which is
    ~20% faster alone. Set before torch loads libgomp; the user's own setting wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


app = typer.Typer(
    help="intellect-node: volunteer compute for decentralized RL of language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # errors are one line (see main); --debug shows Python's own traceback
)
keys_app = typer.Typer(help="Manage this node's Ed25519 identity key.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console(soft_wrap=True)  # no line breaks inside printed paths, addresses, join lines

StateDir = typer.Option(
    None, "--state-dir", envvar="INTELLECT_NODE_STATE_DIR",
    help="State directory (key, shard cache, logs). Default ~/.intellect-node.",
)


def _version_callback(value: bool) -> None:
    if value:
        try:
            console.print(f"intellect-node {version('intellect-node')}")
        except PackageNotFoundError:
            console.print("intellect-node (not installed)")
        raise typer.Exit()


_root_options = {"debug": False}


@app.callback()
def _root(
    _version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                  help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the Python traceback of an error (for bug reports)."),
) -> None:
    _root_options["debug"] = debug


def _state(state_dir: Path | None) -> Path:
    return Path(state_dir) if state_dir else default_state_dir()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(1)


@keys_app.command("show")
def keys_show(state_dir: Path | None = StateDir) -> None:
    """Show peer id, public key and key file (creates the key on first use)."""
    state = _state(state_dir)
    try:
        identity, created = load_identity(state, create=True)
    except IdentityError as e:
        _fail(str(e))
    if created:
        console.print(f"[green]created a new key[/] at {key_path(state)}")
    console.print(f"peer id     {identity.peer_id}")
    console.print(f"public key  {identity.public_key_hex}")
    console.print(f"key file    {key_path(state)}")


@keys_app.command("export")
def keys_export(path: Path, state_dir: Path | None = StateDir) -> None:
    """Copy the private key to PATH (mode 0600) as a backup."""
    try:
        export_key(_state(state_dir), path)
    except IdentityError as e:
        _fail(str(e))
    console.print(f"exported key to {path} (keep it secret: it is your node's identity and credit)")


@keys_app.command("import")
def keys_import(
    path: Path,
    force: bool = typer.Option(False, "--force", help="Replace an existing key."),
    state_dir: Path | None = StateDir,
) -> None:
    """Install the key at PATH as this node's identity."""
    try:
        identity = import_key(_state(state_dir), path, force=force)
    except IdentityError as e:
        _fail(str(e))
    console.print(f"imported key: peer id {identity.peer_id}")


@keys_app.command("new")
def keys_new(
    force: bool = typer.Option(False, "--force", help="Replace an existing key (its credit is lost)."),
    state_dir: Path | None = StateDir,
) -> None:
    """Create a fresh key. Refuses to replace an existing one without --force."""
    try:
        identity = new_identity(_state(state_dir), force=force)
    except IdentityError as e:
        _fail(str(e))
    console.print(f"new key: peer id {identity.peer_id}")


def _logging(headless: bool, state_dir: Path | None = None) -> None:
    import logging

    from rich.logging import RichHandler

    handlers: list[logging.Handler] = [RichHandler(console=Console(stderr=True), show_path=False)] if headless else []
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(state_dir / "log.txt"))
    logging.basicConfig(level=logging.INFO, handlers=handlers or [logging.NullHandler()], force=True,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("hivemind", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def join(
    bootstrap: list[str] = typer.Option(None, "--bootstrap", help="Multiaddr of a peer in the run (repeatable)."),
    run: str = typer.Option(None, "--run", help="Run id (printed by the coordinator)."),
    coordinator: str = typer.Option(None, "--coordinator", help="Coordinator public key (hex)."),
    run_file: Path = typer.Option(None, "--run-file", help="TOML with run_id, coordinator_key, bootstrap "
                                                           "(the coordinator writes one: STATE/run.toml)."),
    config: Path = typer.Option(None, "--config", help="Node settings TOML (flags override it)."),
    state_dir: Path | None = StateDir,
    host: str = typer.Option(None, "--host", help="IP to listen on."),
    port: int = typer.Option(None, "--port", help="TCP port to listen on (0: any free port)."),
    backend: str = typer.Option(None, "--backend", help="hivemind | libp2p: the run's (its join line says)."),
    engine: str = typer.Option(None, "--engine", help="torch | vllm | auto"),
    gpu_memory: float = typer.Option(None, "--gpu-memory", help="Share of GPU memory vLLM may use (0-1)."),
    max_disk: float = typer.Option(None, "--max-disk", help="Disk cap for the shard cache, GB."),
    max_upload_mbit: float = typer.Option(None, "--max-upload-mbit", help="Upload cap for serving shards."),
    client_mode: bool = typer.Option(None, "--client-mode/--no-client-mode", help="Only dial out (behind NAT)."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for generation."),
    max_batches: int = typer.Option(None, "--max-batches", help="Stop after this many batches."),
    pipeline_depth: int = typer.Option(None, "--pipeline-depth", help="Batches that may await verdicts while the "
                                       "next is generated (default 1; 0: wait for each verdict)."),
    headless: bool = typer.Option(False, "--headless", help="Log lines instead of the status screen."),
) -> None:
    """Join a run as a volunteer node: fetch the policy, generate proved rollouts, submit them."""
    from intellect.node.config import NodeConfig
    from intellect.protocol.settings import ConfigError, load_settings

    flags = {"run_id": run, "coordinator_key": coordinator, "state_dir": state_dir, "swarm.host": host,
             "swarm.port": port, "swarm.backend": backend, "swarm.bootstrap": bootstrap or None, "swarm.client_mode": client_mode,
             "swarm.max_upload_mbit": max_upload_mbit, "engine.type": engine, "engine.threads": threads,
             "engine.gpu_memory_fraction": gpu_memory, "max_batches": max_batches,
             "pipeline_depth": pipeline_depth,
             "swarm.max_cache_bytes": int(max_disk * 1e9) if max_disk else None}
    if run_file is not None:
        flags = _run_file_flags(run_file) | {k: v for k, v in flags.items() if v is not None}
    try:
        cfg = load_settings(NodeConfig, config, flags)
    except ConfigError as e:
        missing_run = "run_id:" in str(e) or "coordinator_key:" in str(e)
        _fail(f"{e}" + (" (join needs --run and --coordinator, or --run-file; see `intellect-node join --help`)"
                        if missing_run else ""))
    _logging(headless, cfg.state_dir)
    _run_node(cfg, headless)


def _run_file_flags(path: Path) -> dict:
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        _fail(f"cannot read run file {path}: {e}")
    return {"run_id": data.get("run_id"), "coordinator_key": data.get("coordinator_key"),
            "swarm.bootstrap": data.get("bootstrap"), "swarm.backend": data.get("backend")}


def _run_node(cfg, headless: bool) -> None:
    import signal
    import threading

    from intellect.node.app import NodeApp
    from intellect.protocol.swarm import SwarmJoinError

    node = NodeApp(cfg)
    console.print(f"node {node.identity.peer_id}  key {cfg.state_dir}/node_key.pem  run {cfg.run_id}")
    try:
        node.start()
    except SwarmJoinError as e:
        node.close()
        _fail(f"could not join the swarm: {e}. Check that the coordinator is running and the --bootstrap "
              "addresses are right (copy the join line it prints).")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        if not headless and not sys.stdin.isatty():
            console.print("no terminal on stdin: logging status lines instead of the screen (--headless)")
            headless = True
        if headless:
            _headless_node(node, done)
        else:
            from intellect.node.tui import run_tui

            run_tui(node.status, node.pause, lambda: done.is_set() or node.wait(0))
    except KeyboardInterrupt:
        pass
    finally:
        node.close()
    console.print(f"stopped: submitted {node.status.submitted}, accepted {node.status.accepted}, "
                  f"rejected {node.status.rejected}, credit {node.status.credit} tokens")
    if node.worker is not None and node.worker.fatal:  # no retry can help: say why, exit non-zero
        _fail(f"the node stopped: {node.worker.fatal}")


def _headless_node(node, done) -> None:
    import json
    from dataclasses import asdict

    last = None
    while not done.is_set() and not node.wait(1.0):
        line = {k: v for k, v in asdict(node.status).items() if k in (
            "state", "policy_step", "collect_step", "submitted", "accepted", "rejected", "last_reward", "error")}
        if line != last:
            print(json.dumps(line), flush=True)
            last = line


@app.command("coordinator")
def coordinator_cmd(
    config: Path = typer.Option(None, "--config", help="Run settings TOML (flags override it)."),
    state_dir: Path = typer.Option(None, "--state-dir", help="Coordinator state (key, ledger, checkpoints)."),
    run_name: str = typer.Option(None, "--run-name", help="Name of the run."),
    model: str = typer.Option(None, "--model", help="smollm2 | tiny | PATH to a checkpoint folder."),
    host: str = typer.Option(None, "--host", help="IP to listen on."),
    port: int = typer.Option(None, "--port", help="TCP port to listen on (0: any free port)."),
    bootstrap: list[str] = typer.Option(None, "--bootstrap", help="Join an existing swarm through this peer."),
    backend: str = typer.Option(None, "--backend", help="hivemind | libp2p (swarm.backend); nodes use the same."),
    max_steps: int = typer.Option(None, "--max-steps", help="Stop after this many train steps."),
    metrics_port: int = typer.Option(None, "--metrics-port", help="Serve Prometheus /metrics on this port."),
    max_upload_mbit: float = typer.Option(None, "--max-upload-mbit", help="Upload cap for serving shards."),
    threads: int = typer.Option(None, "--threads", help="torch threads for training and validation."),
    headless: bool = typer.Option(False, "--headless", help="JSON lines instead of the dashboard."),
) -> None:
    """Host a run: validate submissions, train with GRPO, publish each new policy through the swarm."""
    _wait_passively()  # its trainer and its validators run torch at the same time
    from intellect.coordinator.config import CoordinatorConfig
    from intellect.protocol.settings import ConfigError, load_settings

    flags = {"state_dir": state_dir, "run_name": run_name, "model": model, "swarm.host": host, "swarm.port": port,
             "swarm.bootstrap": bootstrap or None, "swarm.backend": backend, "max_steps": max_steps, "metrics_port": metrics_port,
             "swarm.max_upload_mbit": max_upload_mbit, "threads": threads}
    try:
        cfg = load_settings(CoordinatorConfig, config, flags)
    except ConfigError as e:
        _fail(str(e))
    _logging(headless, cfg.state_dir)
    from intellect.coordinator.runner import run_coordinator
    from intellect.coordinator.service import base_model_dir

    with console.status(f"preparing the model {cfg.model} (converted once, then cached)"):
        base_model_dir(cfg.model, cfg.state_dir / "models")
    run_coordinator(cfg, headless=headless, console=console)


@app.command()
def demo(
    headless: bool = typer.Option(False, "--headless", help="JSON lines per step instead of the screen."),
    steps: int = typer.Option(20, "--steps", min=1, help="Train steps to run."),
    nodes: int = typer.Option(2, "--nodes", min=1, help="Node processes to start."),
    model: str = typer.Option("smollm2", "--model", help="smollm2 (default) or tiny (a quick smoke run)."),
    state_dir: Path = typer.Option(None, "--state-dir", help="Where the demo keeps its state (default: a fresh "
                                                             "folder under ~/.intellect-node/demo)."),
    swarm: str = typer.Option("hivemind", "--swarm", help="The swarm backend: hivemind (default) or libp2p."),
) -> None:
    """A coordinator and N nodes on this machine (127.0.0.1) learning arithmetic with SmolLM2-135M."""
    _wait_passively()  # the coordinator and the nodes share this machine's cores (the nodes inherit it)
    from intellect.node.demo import run_demo

    raise typer.Exit(run_demo(steps=steps, num_nodes=nodes, model=model, headless=headless, state_dir=state_dir,
                              console=console, backend=swarm))


@app.command()
def report(
    state_dir: Path = typer.Argument(..., help="A coordinator state dir (the demo's: DEMO/coordinator)."),
    out: Path = typer.Option(None, "--out", help="Folder for the PNGs and summary.md (default STATE_DIR/report)."),
) -> None:
    """Plot reward, length, verdicts per node and step time of a run, with a markdown summary."""
    from intellect.coordinator.report import write_report

    try:
        paths = write_report(state_dir, out)
    except (ValueError, OSError) as e:
        _fail(str(e))
    for p in paths:
        console.print(f"wrote {p}")


@app.command()
def ledger(
    state_dir: Path = typer.Argument(..., help="A coordinator state dir (it holds ledger.sqlite)."),
    verdicts: int = typer.Option(10, "--verdicts", help="How many recent verdicts to list."),
    ban: str = typer.Option(None, "--ban", help="Ban a node by public key (hex)."),
    unban: str = typer.Option(None, "--unban", help="Lift a node's ban (its strikes start over)."),
    reason: str = typer.Option("manual", "--reason", help="Why, for --ban."),
) -> None:
    """Query a run's ledger: nodes with credit and bans, verdicts by reason, recent verdicts; ban/unban."""
    from rich.table import Table

    from intellect.coordinator.ledger import Ledger, LedgerError

    path = state_dir / "ledger.sqlite"
    if not path.is_file():
        _fail(f"{path} not found: pass the coordinator's state dir")
    try:
        with Ledger(path) as led:
            if ban:
                led.ban(ban, reason)
                console.print(f"banned {ban[:16]}...: {reason}")
            if unban:
                led.unban(unban)
                console.print(f"unbanned {unban[:16]}...")
            nodes = Table(title="nodes")
            for col in ("peer id", "public key", "accepted", "rejected", "credit (tokens)", "banned"):
                nodes.add_column(col)
            for n in led.node_table():
                nodes.add_row(n.peer_id, n.public_key[:16], str(n.accepted), str(n.rejected), f"{n.tokens:,}",
                              "[red]yes[/]" if n.banned else "no")
            console.print(nodes)
            console.print("verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(led.counts_by_reason().items())))
            recent = Table(title=f"last {verdicts} verdicts")
            for col in ("node", "file", "verdict", "reason", "detail"):
                recent.add_column(col)
            for v in led.recent_verdicts(verdicts):
                recent.add_row(v.node[:12], (v.content_hash or "-")[:12], "accepted" if v.accepted else "rejected",
                               v.reason, v.detail[:80])
            console.print(recent)
    except LedgerError as e:
        _fail(str(e))


@app.command()
def verify(
    file: Path = typer.Argument(..., help="A signed submission (STATE/sent/*.signed) or a rollout parquet."),
    coordinator_state: Path = typer.Option(..., "--coordinator-state", help="The run's coordinator state dir."),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Policy folder to verify against (default: the "
                                                               "coordinator's checkpoint of the file's step)."),
) -> None:
    """Re-verify a rollout file offline (signature, seeds, rewards, termination, TOPLOC). Exit 0 = valid."""
    from rich.table import Table

    from intellect.coordinator.verify import verify_file

    try:
        results = verify_file(file, coordinator_state, checkpoint)
    except (ValueError, OSError) as e:
        _fail(str(e))
    table = Table(title=f"verify {file.name}")
    for col in ("check", "result", "detail"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, "[green]pass[/]" if r.ok else "[red]FAIL[/]", r.detail)
    console.print(table)
    ok = all(r.ok for r in results)
    console.print("[green]valid[/]" if ok else "[red]invalid[/]")
    raise typer.Exit(0 if ok else 1)


# Errors a user can fix: the message says what to do, no "unexpected" prefix.
_PLAIN_ERRORS = (ValueError, OSError, ImportError, RuntimeError)


def main() -> None:
    """Run the command; an error ends it with one plain line (the traceback only with --debug)."""
    # transformers' per-file progress bars ("Loading weights") would draw through the screens and logs
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except Exception as e:
        if _root_options["debug"]:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, _PLAIN_ERRORS):
            message = (f"unexpected {type(e).__name__}: {message} (run it again as `intellect-node --debug ...` "
                       "for the traceback, and please report it)")
        console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
