"""Quality tools: metrics, fake quantization, the loader's per-layer weight SQNR, the rules that
keep the most sensitive layers in the compute dtype, and first-forward activation statistics.
Imports go one way: metrics -> fake_quant -> weights -> sensitivity / activation_stats."""

from .activation_stats import (
    ACTIVATION_SCHEMES,
    ActivationStats,
    ActivationStatsCollector,
    layer_activation_stats,
)
from .fake_quant import WEIGHT_VARIANTS, fake_quantize_activation, fake_quantize_weight
from .metrics import channel_sqnr_db, mse, psnr_db, relative_l2, sqnr_db, sqnr_from_sums, ssim, weight_sqnr_db
from .sensitivity import (
    SensitivityRule,
    apply_sensitivity,
    choose_sensitive_layers,
    ignore_lines,
    parse_sensitivity_rule,
    plan_with_sensitivity,
)
from .weights import (
    estimate_weight_sqnr_db,
    measure_weight_sqnr,
    other_param_bytes,
    quantized_weight_sqnr_db,
    quantized_weight_sqnr_sums,
    sample_rows,
)

__all__ = [
    "ACTIVATION_SCHEMES",
    "ActivationStats",
    "ActivationStatsCollector",
    "SensitivityRule",
    "WEIGHT_VARIANTS",
    "apply_sensitivity",
    "channel_sqnr_db",
    "choose_sensitive_layers",
    "estimate_weight_sqnr_db",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "ignore_lines",
    "layer_activation_stats",
    "measure_weight_sqnr",
    "mse",
    "other_param_bytes",
    "parse_sensitivity_rule",
    "plan_with_sensitivity",
    "psnr_db",
    "quantized_weight_sqnr_db",
    "quantized_weight_sqnr_sums",
    "relative_l2",
    "sample_rows",
    "sqnr_db",
    "sqnr_from_sums",
    "ssim",
    "weight_sqnr_db",
]
