"""The `intellect-node` command line. Thin: parses arguments and hands off; heavy imports
(torch, hivemind) happen inside the commands that need them so `--help` stays fast."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import typer
from rich.console import Console

from intellect.protocol.identity import (
    IdentityError,
    default_state_dir,
    export_key,
    import_key,
    key_path,
    load_identity,
    new_identity,
)

app = typer.Typer(
    help="intellect-node: volunteer compute for decentralized RL of language models.",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(help="Manage this node's Ed25519 identity key.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console()

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


@app.callback()
def _root(
    _version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                  help="Print the version and exit."),
) -> None:
    pass


def _state(state_dir: Path | None) -> Path:
    return Path(state_dir) if state_dir else default_state_dir()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
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


@app.command()
def demo() -> None:
    """Run a coordinator and two nodes on this machine (not there yet)."""
    _fail("`demo` is not there yet: it arrives with the product issue (coordinator + nodes).")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
