"""KD methods, one file each, registered by name on import."""

from ftikd.methods import ce, ckd, ckd_inbatch, kd  # noqa: F401  (registration)
from ftikd.methods.base import (
    Batch,
    Method,
    MethodConfig,
    MethodContext,
    available_methods,
    build_method,
    method_class,
    register_method,
)

__all__ = [
    "Batch",
    "Method",
    "MethodConfig",
    "MethodContext",
    "available_methods",
    "build_method",
    "method_class",
    "register_method",
]
