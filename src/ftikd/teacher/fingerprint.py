"""Content fingerprint of a model's weights.

The fingerprint names a teacher *version*: a store of teacher outputs is bound to it, so outputs
from one set of weights are never mixed with another's. It hashes exactly what defines the weights
(names, dtypes, shapes and raw bytes, in sorted-name order), so it is the same in every process and
on every machine, and independent of device and of the order the state dict was built in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

FINGERPRINT_CHARS = 20


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of ``t`` (contiguous, on CPU), whatever its dtype."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def state_fingerprint(module_or_state_dict: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Deterministic sha256 hex prefix over a module's (or state dict's) tensors.

    Each entry contributes its name, dtype, shape and bytes, length-prefixed so that no two
    different state dicts can produce the same byte stream.
    """
    if isinstance(module_or_state_dict, nn.Module):
        state: Mapping[str, torch.Tensor] = module_or_state_dict.state_dict()
    else:
        state = module_or_state_dict
    h = hashlib.sha256()
    h.update(b"ftikd-state-v1\0")
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state entry {name!r} is {type(t).__name__}, not a tensor")
        header = f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode()
        data = _tensor_bytes(t)
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:FINGERPRINT_CHARS]
