"""Model families, one module each (see base.py): the one place model knowledge lives."""

# isort: skip_file  (the order is the registration order: generic, the fallback, comes last)
from . import (
    generic,
    wan,
    zimage,  # each module registers its family, detector and reference models on import
)
from .base import (
    FAMILIES,
    FAMILY_ALIASES,
    REFERENCE_MODELS,
    Family,
    FusedLayer,
    IgnoreRule,
    default_ignore_text,
    describe_model,
    detect_family,
    family_choices,
    get_family,
    reference_linear_shapes,
    reference_shapes,
    register_family,
    shape_of,
)

__all__ = [
    "FAMILIES",
    "FAMILY_ALIASES",
    "REFERENCE_MODELS",
    "Family",
    "FusedLayer",
    "IgnoreRule",
    "default_ignore_text",
    "describe_model",
    "detect_family",
    "family_choices",
    "generic",
    "get_family",
    "reference_linear_shapes",
    "reference_shapes",
    "register_family",
    "shape_of",
    "wan",
    "zimage",
]
