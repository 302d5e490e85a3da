"""Progress and cancel for a long load: ComfyUI's progress bar moved by bytes, one console line
per tenth, and ComfyUI's interrupt checked between layers.

The ops' Linear calls `LoadProgress.check()` before it reads a layer and `advance(nbytes)` after
(nodes/ops.py): the weights are read and quantized layer by layer, so this is where the time goes
(minutes for a 28 GB Wan 14B on a CPU). Counting bytes rather than layers keeps the bar even when
layer sizes differ by 100x (Wan's FFN vs its modulation projections).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import comfy.model_management
import comfy.utils

log = logging.getLogger(__name__)


def linear_weight_bytes(sd: Mapping) -> int:
    """Bytes of the 2-D `*.weight` tensors of a state dict: the Linear weights the ops load."""
    total = 0
    for k, v in sd.items():
        shape = getattr(v, "shape", None)
        if k.endswith(".weight") and shape is not None and len(shape) == 2:
            total += v.numel() * v.element_size()
    return total


class LoadProgress:
    """One load's progress: `comfy.utils.ProgressBar` (the queue's bar and the node's
    websocket `progress` messages) and a log line at each 10%."""

    def __init__(self, total_bytes: int, label: str) -> None:
        self.total = max(int(total_bytes), 1)
        self.label = label
        self.done = 0
        self.layers = 0
        self._next_tenth = 1
        self._t0 = time.perf_counter()
        self._bar = comfy.utils.ProgressBar(self.total)

    @staticmethod
    def check() -> None:
        """Raise ComfyUI's InterruptProcessingException when Cancel was pressed (and clear it)."""
        comfy.model_management.throw_exception_if_processing_interrupted()

    def advance(self, nbytes: int) -> None:
        self.done = min(self.total, self.done + int(nbytes))
        self.layers += 1
        self._bar.update_absolute(self.done)
        tenth = self.done * 10 // self.total
        if tenth >= self._next_tenth:
            self._next_tenth = tenth + 1
            log.info(
                "OnlineQuant %s: %d%% loaded (%.2f / %.2f GB, %d layers, %.1f s)",
                self.label,
                tenth * 10,
                self.done / 1e9,
                self.total / 1e9,
                self.layers,
                time.perf_counter() - self._t0,
            )

    def advance_and_check(self, nbytes: int) -> None:
        """`advance`, then stop if Cancel was pressed: for readers that report each tensor."""
        self.advance(nbytes)
        self.check()

    def finish(self) -> None:
        self._bar.update_absolute(self.total)
