"""KD methods, one file each, registered by name on import.

Every module of this package is imported here (shared pieces register nothing), so a new method
is one new file with a ``@register_method`` class: nothing else to edit.
"""

import importlib
import pkgutil

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

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

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
