"""One load's state: the plan, the records, the GPU staging of weights and the verdicts queued
by GPU quantization (read once, when the load ends). Used by the ops class of nodes/ops.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..quant.errors import NonFiniteWeightError
from ..quant.formats import get_format
from ..quant.quality.metrics import sqnr_from_sums
from .report import LayerRecord


def to_quantize_device(weight: torch.Tensor, qdev: torch.device) -> torch.Tensor:
    """`weight` on the quantization device. A lazily read weight (quant.checkpoint) bound
    for a CUDA GPU is read straight into pinned host memory (one positioned read, no pageable
    temporary) and copied with `non_blocking=True`: the quantizer's kernels queue behind the copy
    on the same stream, and PyTorch's caching host allocator keeps the pinned block until the
    copy is done (same-shape layers reuse it). Anything else, or a pinning failure: `.to()`."""
    if hasattr(weight, "_reader"):
        weight._reader.checked_by_caller(weight._name)  # the quantizer checks NaN/Inf where it runs
    if qdev.type == "cuda" and hasattr(weight, "_reader") and weight.device.type == "cpu":
        try:
            host = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
        except RuntimeError:  # pinning refused (locked-memory limit, driver): the plain copy
            return weight.to(device=qdev)
        host.copy_(weight)
        return host.to(device=qdev, non_blocking=True)
    return weight.to(device=qdev)


# GPU layers queued ahead of the one being read (LoadState.queue)
MAX_INFLIGHT = 2


def defers_checks(device: torch.device) -> bool:
    """Whether quantizing on `device` queues its NaN/Inf verdicts and SQNR sums (LoadState.pending)
    instead of waiting for each: on a GPU, where waiting would cost the read/compute overlap."""
    return device.type == "cuda"


def non_finite_weight_error(
    name: str, n: int, k: int, why: str = "", *, packed: bool = False
) -> NonFiniteWeightError:
    if packed:  # read already quantized from a packed file: nothing to keep or quantize again
        return NonFiniteWeightError(
            f"layer {name!r}: the packed weight [{n}x{k}] read from the file holds NaN/Inf codes; the "
            "file is damaged: save it again, or load the bf16 model it was made from"
        )
    detail = f" ({why})" if why else ""
    return NonFiniteWeightError(
        f"layer {name!r}: the weight [{n}x{k}] contains NaN or Inf and cannot be quantized{detail}; "
        f"the checkpoint is damaged, or add {name!r} to the ignored layers to keep it"
    )


@dataclass
class LoadState:
    """Everything one load needs and records; one instance per `make_ops` call."""

    plan: Any  # quant.selection.plan.QuantPlan
    format: str
    compute: str = "auto"
    quantize_device: torch.device | None = None
    # where packed weights are kept: the quantization device when the whole quantized model fits
    # there (nodes/placement.py), else None = the module's own device (ComfyUI's choice)
    packed_device: torch.device | None = None
    record_sqnr: bool = True
    records: list[LayerRecord] = field(default_factory=list)
    quantize_seconds: float = 0.0
    seen: set[str] = field(default_factory=set)
    progress: Any = None  # nodes.progress.LoadProgress, set by the loader
    source: str = ""  # the file's name, for the header of a "Save Quantized Model" file
    # layers whose weights this load reads already packed from a file: their bytes get the
    # format's NaN/Inf check where they land (nodes/ops.py), not the quantizer's
    packed_from_file: set[str] = field(default_factory=set)
    # GPU quantization queues each layer's NaN/Inf verdict and SQNR sums here instead of waiting
    # for them (a synchronisation per layer would keep the next layer's read from overlapping this
    # one's copy and quantization); `settle` reads them all at once when the load ends.
    # (record, finite verdict, SQNR sums or None, whether the weight came packed from a file)
    pending: list[tuple[LayerRecord, torch.Tensor, torch.Tensor | None, bool]] = field(default_factory=list)
    inflight: list[Any] = field(default_factory=list)  # CUDA events of the layers still being copied

    def queue(
        self,
        record: LayerRecord,
        finite: torch.Tensor,
        sums: torch.Tensor | None,
        device: torch.device,
        *,
        packed: bool = False,
    ) -> None:
        """Keep a layer's verdicts for `settle` (a GPU-quantized layer's, or `packed`, the check
        of bytes read already packed); on a GPU wait for the layer queued MAX_INFLIGHT layers
        ago, so the pinned staging buffers stay a few layers' worth."""
        self.pending.append((record, finite, sums, packed))
        if device.type != "cuda":
            return  # nothing runs ahead of the host elsewhere
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self.inflight.append(event)
        if len(self.inflight) > MAX_INFLIGHT:
            self.inflight.pop(0).synchronize()

    def settle(self) -> None:
        """Read the queued verdicts (one synchronisation): a weight that held NaN/Inf raises
        NonFiniteWeightError naming its layer; SQNR sums become the records' dB."""
        pending, self.pending, self.inflight = self.pending, [], []
        if not pending:
            return
        finite = torch.stack([f for _, f, _, _ in pending]).cpu().tolist()
        for (record, _, _, packed), ok in zip(pending, finite, strict=True):
            if not ok:
                n, k = record.out_features, record.in_features
                raise non_finite_weight_error(record.name, n, k, packed=packed)
        measured = [(record, sums) for record, _, sums, _ in pending if sums is not None]
        if measured:
            values = torch.stack([sums for _, sums in measured]).cpu().tolist()
            for (record, _), (signal, noise) in zip(measured, values, strict=True):
                record.sqnr_db = sqnr_from_sums(signal, noise)

    def compute_for(self, decision: Any) -> str:
        """The layer's compute mode: the format's weight-only mode where the plan says
        `weights-only` (activations stay in the compute dtype), else the load's own."""
        if decision is not None and decision.precision == "weights-only":
            return get_format(self.format).computes[-1]  # formats list their weight-only mode last
        return self.compute
