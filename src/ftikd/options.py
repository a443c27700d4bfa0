"""``key=value`` method options from the command line (``--opt k=3``, ``ckd:k=3,lr=0.01``)."""

from __future__ import annotations

from typing import Any

from ftikd.errors import FtikdError


def parse_value(text: str) -> Any:
    """Interpret a ``key=value`` value as bool, int, float or string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["k=3", "form=kl"]`` -> ``{"k": 3, "form": "kl"}``; malformed pairs are a user error."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FtikdError(f"method option {pair!r} must look like key=value, e.g. k=3")
        options[key.strip()] = parse_value(value.strip())
    return options


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"ckd:k=3,form=kl"`` -> ``("ckd", {"k": 3, "form": "kl"})``; a bare name has no options."""
    name, _, opts = spec.partition(":")
    return name.strip(), parse_options([o for o in opts.split(",") if o.strip()])
