"""The generic family: any other transformer, with name-based defaults that keep embedders,
modulation and output projections in the compute dtype. Registered last: it detects nothing."""

from __future__ import annotations

from .base import Family, IgnoreRule, register_family

FAMILY = Family(
    key="generic",
    display_name="generic transformer",
    ignore=(
        IgnoreRule("re:embed", "input, timestep and text embedders (any name containing 'embed')"),
        IgnoreRule("re:adaLN|modulation", "modulation projections: their errors scale the residual stream"),
        IgnoreRule(
            r"re:(^|\.)(final_layer|proj_out|norm_out|head)(\.|$)",
            "output projection: errors land directly in the prediction",
        ),
    ),
)

register_family(FAMILY)
