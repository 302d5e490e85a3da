"""The "Compare Models (Online Quant)" node: how far a quantized model is from its reference.

It samples twice with ComfyUI's own sampler (same seed, steps, sampler, conditioning): first the
reference model, recording after every denoiser evaluation the input `x`, the sigma and the
denoised prediction (after CFG); then the quantized model, measuring at each evaluation
- trajectory error: its own denoised prediction vs the reference's at the same index (errors
  compound along the run; this is what the user will see);
- teacher-forced error (optional): the quantized denoiser evaluated on the REFERENCE run's `x`
  at that step, so each step's number is that step's own error (one extra forward per step).
Then the final latents, and when a VAE is given, PSNR/SSIM of the decoded images or frames.
Optionally: activation statistics of the reference model's first forward (W8A8/W4A4 error per
layer) and per-layer weight SQNR of the quantized model's Linear layers vs the reference's, with
the worst ones as text to paste into the loader's ignored-layers field.

Memory: both MODELs are held by the workflow anyway; ComfyUI's model management loads one at a
time onto the GPU for its sampling (it offloads the other when VRAM is short). This node adds,
in CPU RAM, three latents per denoiser evaluation of the reference run (x, denoised, fp32):
steps x evaluations/step x 3 x latent bytes, e.g. Wan 2.2 5B 1280x704x121 (5.2 M values, 21 MB)
x 20 steps = 1.3 GB; Z-Image 1024² (65 k values) is negligible. Teacher forcing doubles the
quantized run's denoiser time. A streaming layer-by-layer mode (one bf16 layer at a time) is
not implemented.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch
from comfy.quant_ops import QuantizedTensor
from comfy_api.latest import io, ui

from ..quant.quality import (
    ActivationStatsCollector,
    ignore_lines,
    psnr_db,
    quantized_weight_sqnr_db,
    relative_l2,
    sqnr_db,
    ssim,
)
from . import names
from .layouts import as_quantized_weight, is_online_quant

log = logging.getLogger(__name__)


@dataclass
class StepError:
    index: int  # denoiser evaluation number (one per model call of the sampler)
    sigma: float
    trajectory_sqnr_db: float
    trajectory_rel_l2: float
    teacher_sqnr_db: float | None = None
    teacher_rel_l2: float | None = None


@dataclass
class CompareResult:
    steps: list[StepError] = field(default_factory=list)
    latent_sqnr_db: float = math.nan
    latent_rel_l2: float = math.nan
    image_psnr_db: float | None = None
    image_ssim: float | None = None
    images: int = 0
    layer_sqnr: dict[str, float] = field(default_factory=dict)
    worst_layers: list[str] = field(default_factory=list)
    activation_table: str = ""
    notes: list[str] = field(default_factory=list)
    seconds_reference: float = 0.0
    seconds_quantized: float = 0.0

    def to_text(self) -> str:
        lines = ["OnlineQuant compare: quantized vs reference (same seed, sampler, conditioning)"]
        lines.append(
            f"time: reference {self.seconds_reference:.1f} s, quantized {self.seconds_quantized:.1f} s"
        )
        lines.append("denoiser output error per evaluation (SQNR dB, higher is better | relative L2):")
        head = "  #   sigma      trajectory"
        if any(s.teacher_sqnr_db is not None for s in self.steps):
            head += "            teacher-forced"
        lines.append(head)
        for s in self.steps:
            row = f"  {s.index:<3d} {s.sigma:<9.4g} {_db(s.trajectory_sqnr_db):>7} | "
            row += f"{s.trajectory_rel_l2:7.2%}"
            if s.teacher_sqnr_db is not None:
                row += f"     {_db(s.teacher_sqnr_db):>7} | {s.teacher_rel_l2:7.2%}"
            lines.append(row)
        lines.append(
            f"final latent: {_db(self.latent_sqnr_db)} dB SQNR, relative L2 {self.latent_rel_l2:.2%}"
        )
        if self.image_psnr_db is not None:
            lines.append(
                f"decoded ({self.images} image{'s' if self.images != 1 else ''}/frames): "
                f"PSNR {_db(self.image_psnr_db)} dB, SSIM {self.image_ssim:.4f}"
            )
        if self.layer_sqnr:
            vals = list(self.layer_sqnr.values())
            finite = [v for v in vals if math.isfinite(v)]
            lines.append(
                f"weight SQNR of {len(vals)} quantized Linear layers: "
                f"min {_db(min(vals))} dB, mean {_db(sum(finite) / max(len(finite), 1))} dB"
            )
            if self.worst_layers:
                lines.append("worst layers (paste into the loader's ignored_layers to keep them in bf16):")
                lines.append(ignore_lines(self.worst_layers, self.layer_sqnr))
        if self.activation_table:
            lines.append(self.activation_table)
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


def _db(x: float) -> str:
    if x == math.inf:
        return "inf"
    if x == -math.inf:
        return "-inf"
    return "nan" if math.isnan(x) else f"{x:.1f}"


def _sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise):
    """KSampler's sampling (nodes.common_ksampler) without the preview callback."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    samples = comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent_image,
        denoise=denoise,
        noise_mask=latent.get("noise_mask"),
        disable_pbar=True,
        seed=seed,
    )
    out = latent.copy()
    out["samples"] = samples
    return out


def _options_without(model_options: dict, fn) -> dict:
    opts = dict(model_options)
    opts["sampler_post_cfg_function"] = [f for f in opts.get("sampler_post_cfg_function", []) if f is not fn]
    return opts


def layer_weight_sqnr(quantized, reference) -> dict[str, float]:
    """Per Linear layer whose weight differs in type between the two models (quantized vs plain):
    SQNR (dB) of the dequantized weight against the reference's, one layer at a time on the
    quantized model's load device (our layouts: on 256 sampled rows, as the load report does)."""
    qmods = dict(quantized.model.diffusion_model.named_modules())
    dev = quantized.load_device
    out = {}
    for name, rm in reference.model.diffusion_model.named_modules():
        qm = qmods.get(name)
        if not isinstance(rm, torch.nn.Linear) or qm is None or getattr(qm, "weight", None) is None:
            continue
        qw = qm.weight
        if not isinstance(qw, QuantizedTensor) or tuple(qw.shape) != tuple(rm.weight.shape):
            continue  # kept in high precision (or not comparable)
        with torch.no_grad():
            if is_online_quant(qw):  # ours: 256 sampled rows, exact per row, ~1% of a dequantize
                out[name] = quantized_weight_sqnr_db(rm.weight.to(dev), as_quantized_weight(qw.to(dev)))
            else:  # another pack's / ComfyUI's own quantized tensor: full dequantize
                out[name] = sqnr_db(rm.weight.to(dev), qw.to(dev).dequantize())
    return out


def compare_models(
    quantized,
    reference,
    positive,
    negative,
    latent: dict,
    *,
    seed: int = 0,
    steps: int = 4,
    cfg: float = 1.0,
    sampler_name: str = "euler",
    scheduler: str = "simple",
    denoise: float = 1.0,
    vae=None,
    teacher_forced: bool = True,
    activation_stats: bool = False,
    worst_layers: int = 10,
) -> tuple[CompareResult, dict, dict]:
    """Run the comparison; returns (result, quantized latent, reference latent). Plain Python,
    callable from tests and scripts; the node is a thin wrapper."""
    res = CompareResult()
    records: list[tuple[torch.Tensor, float, torch.Tensor]] = []

    def record_ref(args):
        d = args["denoised"]
        x = args["input"].detach().float().cpu()
        records.append((x, _sigma(args["sigma"]), d.detach().float().cpu()))
        return d

    ref = reference.clone()
    ref.set_model_sampler_post_cfg_function(record_ref)
    collector = None
    if activation_stats:
        collector = ActivationStatsCollector(ref.model.diffusion_model)
        collector.__enter__()
    t0 = time.perf_counter()
    try:
        ref_latent = _sample(
            ref, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise
        )
    finally:
        if collector is not None:
            collector.remove()
    res.seconds_reference = time.perf_counter() - t0
    if collector is not None:
        res.activation_table = collector.table(worst_layers if worst_layers > 0 else 10)

    counter = [0]

    def measure_q(args):
        d = args["denoised"]
        i = counter[0]
        counter[0] += 1
        if i >= len(records):
            return d
        x_ref, sigma_ref, d_ref = records[i]
        sigma = _sigma(args["sigma"])
        step = StepError(i, sigma, sqnr_db(d_ref, d.float().cpu()), relative_l2(d_ref, d.float().cpu()))
        if teacher_forced and math.isclose(sigma, sigma_ref, rel_tol=1e-4, abs_tol=1e-6):
            with torch.no_grad():
                d_tf = comfy.samplers.sampling_function(
                    args["model"],
                    x_ref.to(device=args["input"].device, dtype=args["input"].dtype),
                    args["sigma"],
                    args["uncond"],
                    args["cond"],
                    args["cond_scale"],
                    _options_without(args["model_options"], measure_q),
                )
            step.teacher_sqnr_db = sqnr_db(d_ref, d_tf.float().cpu())
            step.teacher_rel_l2 = relative_l2(d_ref, d_tf.float().cpu())
        res.steps.append(step)
        return d

    q = quantized.clone()
    q.set_model_sampler_post_cfg_function(measure_q)
    t0 = time.perf_counter()
    q_latent = _sample(q, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise)
    res.seconds_quantized = time.perf_counter() - t0
    if counter[0] != len(records):
        res.notes.append(
            f"the runs made {len(records)} (reference) and {counter[0]} (quantized) denoiser evaluations; "
            "only the first ones are compared"
        )
    res.latent_sqnr_db = sqnr_db(ref_latent["samples"], q_latent["samples"])
    res.latent_rel_l2 = relative_l2(ref_latent["samples"], q_latent["samples"])

    if vae is not None:
        img_ref = _decode(vae, ref_latent)
        img_q = _decode(vae, q_latent)
        res.images = int(img_ref.shape[0])
        res.image_psnr_db = psnr_db(img_ref, img_q)
        res.image_ssim = ssim(img_ref, img_q)

    if worst_layers > 0:
        res.layer_sqnr = layer_weight_sqnr(quantized, reference)
        ranked = sorted(res.layer_sqnr, key=lambda n: (res.layer_sqnr[n], n))
        res.worst_layers = ranked[:worst_layers]
        if not res.layer_sqnr:
            res.notes.append("no quantized Linear layer found in the first model (is it the quantized one?)")
    return res, q_latent, ref_latent


def _sigma(s) -> float:
    return float(s.flatten()[0]) if isinstance(s, torch.Tensor) else float(s)


def _decode(vae, latent: dict) -> torch.Tensor:
    images = vae.decode(latent["samples"])
    if images.dim() == 5:  # video: frames of every batch item in one batch, as VAEDecode does
        images = images.reshape(-1, *images.shape[-3:])
    return images.float().cpu()


class OnlineQuantCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=names.COMPARE,
            display_name=names.DISPLAY_NAMES[names.COMPARE],
            **names.search_alias_kwargs(io.Schema, names.COMPARE),
            category=names.CATEGORY,
            description=(
                "Samples with the quantized and the reference model (same seed and settings) and reports "
                "the denoiser error per step, the final latent error and, with a VAE, PSNR/SSIM of the "
                "decoded images or frames, plus the quantized layers with the worst weight error. "
                "Holds both models (ComfyUI keeps one on the GPU at a time)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The quantized model (from the Online Quant loader)."),
                io.Model.Input(
                    "reference_model", tooltip="The same model loaded unquantized (quantization none)."
                ),
                io.Conditioning.Input("positive", tooltip="Positive conditioning, as for KSampler."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning, as for KSampler."),
                io.Latent.Input("latent_image", tooltip="Starting latent (e.g. Empty Latent Image)."),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="Noise seed, the same for both runs.",
                ),
                io.Int.Input("steps", default=8, min=1, max=1000, tooltip="Sampling steps of each run."),
                io.Float.Input(
                    "cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                    tooltip="CFG scale (1.0 runs the model once per step: half the time).",
                ),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="Scheduler, as in KSampler."),
                io.Boolean.Input(
                    "teacher_forced", default=True,
                    tooltip=(
                        "Also run the quantized denoiser on the reference run's input at each step, so each "
                        "step's error is its own (not accumulated). One extra forward per step."
                    ),
                ),
                io.Boolean.Input(
                    "activation_stats", default=False,
                    tooltip=(
                        "Record per-Linear input statistics on the reference model's first forward "
                        "(max per channel, kurtosis, W8A8/W4A4 output error). Costs one extra matmul "
                        "per layer per scheme on the first step."
                    ),
                ),
                io.Int.Input(
                    "worst_layers", default=10, min=0, max=1000,
                    tooltip="List this many quantized layers with the worst weight SQNR (0 = skip).",
                ),
                io.Vae.Input(
                    "vae", optional=True, tooltip="When given, decode both results and report PSNR/SSIM."
                ),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="The comparison as text."),
                io.Latent.Output(display_name="quantized_latent", tooltip="Result of the quantized model."),
                io.Latent.Output(display_name="reference_latent", tooltip="Result of the reference model."),
            ],
        )

    @classmethod
    def execute(
        cls, model, reference_model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
        scheduler, teacher_forced, activation_stats, worst_layers, vae=None,
    ) -> io.NodeOutput:
        res, q_latent, ref_latent = compare_models(
            model, reference_model, positive, negative, latent_image,
            seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, vae=vae,
            teacher_forced=teacher_forced, activation_stats=activation_stats, worst_layers=worst_layers,
        )
        text = res.to_text()
        log.info("%s", text)
        return io.NodeOutput(text, q_latent, ref_latent, ui=ui.PreviewText(text))
