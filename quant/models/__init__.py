"""Model families, one module each (see base.py): the one place model knowledge lives."""

# Each family module registers its family, detector and reference models on import; the order
# of these lines is the order families are listed in.
# fmt: off
from . import zimage  # isort: skip
from . import wan  # isort: skip
from . import generic  # isort: skip
# fmt: on
from .base import (
    FAMILIES,
    FAMILY_ALIASES,
    REFERENCE_MODELS,
    Family,
    FusedLayer,
    IgnoreRule,
    ReferenceModel,
    default_ignore_text,
    default_rules,
    describe_model,
    detect_family,
    family_choices,
    get_family,
    get_reference,
    reference_linear_shapes,
    reference_shapes,
    register_family,
    shape_of,
    unloadable_layout,
)

__all__ = [
    "FAMILIES",
    "FAMILY_ALIASES",
    "REFERENCE_MODELS",
    "Family",
    "FusedLayer",
    "ReferenceModel",
    "IgnoreRule",
    "default_ignore_text",
    "default_rules",
    "describe_model",
    "detect_family",
    "family_choices",
    "generic",
    "get_family",
    "get_reference",
    "reference_linear_shapes",
    "reference_shapes",
    "register_family",
    "shape_of",
    "unloadable_layout",
    "wan",
    "zimage",
]
