"""The policies validation judges by: published checkpoints, loaded when a step is first asked for and
kept for the last `keep` steps asked (least recently used goes first). The coordinator's intake and
every validator worker hold one.

A step after the first is loaded as a copy of a loaded policy that takes the new weights: about a third
of a fresh load.

What this module does not know: which steps are published or fresh enough (the caller asks for a step
it has judged usable), or the checkpoint's other files.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from pathlib import Path


def policy_dir(checkpoints: Path, step: int) -> Path:
    """The exported policy of checkpoint `step` (coordinator/trainer/checkpoint.py's layout)."""
    from intellect.coordinator.trainer.checkpoint import POLICY_DIR

    return Path(checkpoints) / f"step_{step:08d}" / POLICY_DIR


class PolicyCache:
    """`cache(step)`: the model of policy `step` in `compute_dtype(device)`, eval mode. Thread-safe."""

    def __init__(self, checkpoints: Path, keep: int, device: str = "cpu") -> None:
        self.checkpoints, self.keep, self.device = Path(checkpoints), keep, device
        self._models: OrderedDict[int, object] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, step: int):
        from intellect.protocol.model import load_model, load_weights

        with self._lock:
            if step in self._models:
                self._models.move_to_end(step)
                return self._models[step]
            folder = policy_dir(self.checkpoints, step)
            if self._models:
                model = copy.deepcopy(next(reversed(self._models.values())))
                load_weights(model, folder)
            else:
                model, _ = load_model(folder, device=self.device)
            self._models[step] = model
            while len(self._models) > self.keep:
                self._models.popitem(last=False)
            return model
