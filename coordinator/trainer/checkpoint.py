"""Crash-safe trainer checkpoints: the exported policy plus everything needed to resume exactly (B.8).

Layout of `<dir>/step_<00000012>/`:
- `policy/`: `model.safetensors` (bf16, metadata {"format": "pt"}), `config.json`, generation and
  tokenizer files when known; loadable with `from_pretrained` and ready to be sharded and published.
- `weights.safetensors`: the parameters at training precision (bf16 export alone would not resume
  bit-exactly).
- `trainer_state.pt`: step, optimizer, scheduler, torch/numpy/python RNG states, caller's extra dict.
The last two (2-4x the policy's size) are written only when the caller asks for the whole state
(`full_state`; the coordinator every `full_state_every` steps and at exit), or added to a policy-only
folder afterwards (`add_training_state`). Only the newest folder holding them keeps them, and pruning
never removes it: older folders stay as policies, which the validator needs for submissions up to
async_level steps behind. A checkpoint is written under `.tmp-*`, fsynced, then renamed into place, so
a crash leaves either the whole folder or a temp folder that `load_latest` ignores. Under FSDP the trainer gathers the full
state on rank 0 and hands it over (`model_state`, `optimizer_state`, keyed by parameter name), and
resumes from `read_latest`'s dicts; weights are stored without the tied LM head (the input embedding
holds it), and a loader fills it back in. Knows nothing about shards or manifests.
"""

from __future__ import annotations

import copy
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from intellect.protocol.files import fsync_dir

POLICY_DIR = "policy"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(directory: str | Path, step: int) -> Path:
    """The folder of checkpoint `step` under `directory`."""
    return Path(directory) / f"step_{step:08d}"


def step_of(folder: Path) -> int:
    """The policy step a checkpoint folder holds (its name, `step_<8 digits>`)."""
    return int(_STEP_DIR.match(folder.name).group(1))


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    extra: dict[str, Any]


def save_checkpoint(
    directory: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any] | None = None,
    tokenizer: Any = None,
    keep: int = 2,
    *,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    full_state: bool = True,
) -> Path:
    """Write checkpoint `step` atomically, keep the newest `keep` policies; returns its folder.
    `model_state` / `optimizer_state`: the full state gathered under FSDP (the optimizer's keyed by
    parameter name); by default the model's and the optimizer's own. `full_state` False writes the
    policy alone (the optimizer is not read)."""
    weights = untied(model_state if model_state is not None else model.state_dict(), model)
    if keep < 1:
        raise ValueError("keep must be >= 1")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        export_policy(tmp / POLICY_DIR, model, tokenizer, state=weights)
        if full_state:
            _write_training_state(tmp, step, weights, optimizer, scheduler, extra, optimizer_state)
        _fsync_tree(tmp)
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep)
    return final


def add_training_state(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any] | None = None,
    *,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """Make the policy-only checkpoint `folder` resumable: write the weights and the trainer state
    beside its policy, which is left as it is (it may be out in the swarm). The state file lands last,
    so a crash in between leaves a folder that is not resumable, never a half-written state."""
    step = step_of(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-state-{folder.name}-", dir=folder.parent))
    try:
        weights = untied(model_state if model_state is not None else model.state_dict(), model)
        _write_training_state(tmp, step, weights, optimizer, scheduler, extra, optimizer_state)
        _fsync_tree(tmp)
        os.replace(tmp / WEIGHTS_FILE, folder / WEIGHTS_FILE)
        os.replace(tmp / STATE_FILE, folder / STATE_FILE)
        fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _drop_older_states(folder.parent)


def _write_training_state(folder: Path, step: int, weights: dict[str, torch.Tensor], optimizer, scheduler,
                          extra: dict[str, Any] | None, optimizer_state: dict[str, Any] | None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(folder / WEIGHTS_FILE))
    state = {
        "step": step,
        "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
        "optimizer_by_name": optimizer_state is not None,
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "extra": extra or {},
    }
    torch.save(state, folder / STATE_FILE)


def export_policy(directory: Path, model: torch.nn.Module, tokenizer: Any = None,
                  state: dict[str, torch.Tensor] | None = None) -> None:
    """The policy as a bf16 `from_pretrained` folder (`state`: the model's full state, if not its own)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in (state if state is not None else model.state_dict()).items():
        # Tied weights share storage; keep the first name (the input embedding in HF causal LMs),
        # from_pretrained re-ties the LM head to it as the config's tie_word_embeddings says.
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.dtype = torch.bfloat16
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_latest(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> LoadedCheckpoint | None:
    """Restore the newest complete checkpoint (temp folders ignored); None if there is none."""
    found = read_latest(directory)
    if found is None:
        return None
    path, weights, state = found
    model.load_state_dict(tied(weights, model), strict=True)
    if optimizer is not None:
        if state.get("optimizer_by_name"):  # written under FSDP: keyed by parameter name
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    return LoadedCheckpoint(path, int(state["step"]), dict(state["extra"]))


def read_latest(directory: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(folder, weights, trainer state) of the newest resumable checkpoint, on the CPU; None if none."""
    from safetensors.torch import load_file

    steps = resumable_checkpoints(directory)
    if not steps:
        return None
    path = steps[-1]
    # weights_only=False: the file holds numpy RNG state; it is our own local file, never wire input.
    return path, load_file(path / WEIGHTS_FILE), torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)


def _tied_names(model: torch.nn.Module) -> tuple[str, str] | None:
    """(input embedding, LM head) weight names when the model ties them, else None."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None or id(inp) not in names or id(out) not in names:
        return None
    return f"{names[id(inp)]}.weight", f"{names[id(out)]}.weight"


def untied(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` without the tied LM head (the embedding holds the same values)."""
    names = _tied_names(model)
    return {k: v for k, v in state.items() if names is None or k != names[1]}


def tied(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` with a tied pair's missing name filled from the other (checkpoints of either writer)."""
    names = _tied_names(model)
    if names is None:
        return state
    inp, out = names
    state = dict(state)
    if inp not in state and out in state:
        state[inp] = state[out]
    if out not in state and inp in state:
        state[out] = state[inp]
    return state


def complete_checkpoints(directory: str | Path) -> list[Path]:
    """Finished checkpoint folders (each holds a whole policy) under `directory`, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / POLICY_DIR / "model.safetensors").is_file()]
    return sorted(found, key=lambda p: p.name)


def resumable_checkpoints(directory: str | Path) -> list[Path]:
    """Finished checkpoints that still hold the training state to resume from, oldest first."""
    return [p for p in complete_checkpoints(directory) if (p / STATE_FILE).is_file() and (p / WEIGHTS_FILE).is_file()]


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final` atomically; an existing `final` (same step saved again) is swapped out."""
    old = None
    if final.exists():
        old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def _prune(root: Path, keep: int) -> None:
    newest_state = _drop_older_states(root)
    for path in complete_checkpoints(root)[:-keep]:
        if path not in newest_state:  # the newest whole state stays, however old
            shutil.rmtree(path)
    for path in root.glob(".tmp-*"):  # leftovers of a crashed save (this process is the only writer)
        shutil.rmtree(path, ignore_errors=True)


def _drop_older_states(root: Path) -> list[Path]:
    """Remove the training state from every resumable folder but the newest (older state is dead weight);
    returns that newest one ([] if none)."""
    resumable = resumable_checkpoints(root)
    for path in resumable[:-1]:
        (path / WEIGHTS_FILE).unlink()  # weights first: a folder with a state file but no weights is not resumable
        (path / STATE_FILE).unlink()
    return resumable[-1:]


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(Path(folder))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """The RNG states a checkpoint saved (torch, numpy, python, CUDA)."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
