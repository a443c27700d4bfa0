"""Any ``timm`` architecture as a student, with named features taken by forward hooks.

Optional: needs the ``timm`` extra (``pip install 'ftikd[timm]'``), which brings torchvision, so a
torch and torchvision that import together (``scripts/test-timm.sh`` builds such an environment
in ``.venv-timm``). Importing this module never imports timm; building a model does.

``build_model("timm:NAME")`` (and ``--student timm:NAME`` on the command line) builds timm's
``NAME`` with ``pretrained=False``: nothing is ever downloaded. ``timm:NAME@PATH`` then loads the
weights of a local ``.safetensors`` or ``.pt``/``.pth`` file (:func:`load_local_weights`).

Features, as in DESIGN.md ("Model output") but taken with hooks on module paths of the unmodified
timm model (the torchdistill approach) instead of a hand-written forward:

* ``features={"stage2": "layer2", ...}`` names the output of any submodule (its first tensor when
  it returns a tuple; the last call when a module runs twice in one forward). A module whose
  output an in-place op changes later (a BN before an in-place ReLU) yields the changed value:
  tap the activation module instead.
* Without ``features``, timm's own ``feature_info`` taps are used: an entry at stride <= 2 that
  comes first is ``stem``, the others are ``stage1``, ``stage2``, ... in order (for a timm ResNet:
  ``stem`` = ``act1``, ``stage{i}`` = ``layer{i}``).
* ``embedding`` is always there: the input of timm's classifier (the pooled pre-logits), of width
  ``embedding_dim``.

There is no ``stage{i}_pre``: a hook sees a module's output, not the value before its last ReLU.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftikd.errors import FtikdError
from ftikd.models.base import ModelOutput

EXTRA_HINT = "pip install 'ftikd[timm]' (see scripts/test-timm.sh)"


def _timm() -> Any:
    """Import timm, or say which extra to install (torchvision fails to import beside some torch builds)."""
    try:
        import timm
    except Exception as exc:  # ImportError, or torchvision's RuntimeError on a mismatched torch
        raise FtikdError(f"timm students need the optional extra: {EXTRA_HINT} ({exc})") from None
    return timm


def default_taps(feature_info: list[dict[str, Any]]) -> dict[str, str]:
    """Feature names for timm's ``feature_info`` entries: a leading stride-<=2 entry is ``stem``."""
    taps: dict[str, str] = {}
    for info in feature_info:
        if not taps and info.get("reduction", 32) <= 2:
            taps["stem"] = info["module"]
        else:
            taps[f"stage{len(taps) + (0 if 'stem' in taps else 1)}"] = info["module"]
    return taps


def _first_tensor(value: Any) -> torch.Tensor:
    """A hooked module's output, or its first tensor when it returns a tuple/list."""
    if isinstance(value, torch.Tensor):
        return value
    return next(v for v in value if isinstance(v, torch.Tensor))


class TimmStudent(nn.Module):
    """A timm model returning :class:`ModelOutput` with hook-tapped named features."""

    def __init__(
        self,
        model_name: str,
        *,
        in_channels: int = 3,
        num_classes: int = 100,
        features: Mapping[str, str] | None = None,
        weights: str | Path | None = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a student needs num_classes >= 1, got {num_classes}")
        timm = _timm()
        try:
            self.model = timm.create_model(
                model_name, pretrained=False, in_chans=in_channels, num_classes=num_classes, **timm_kwargs
            )
        except RuntimeError as exc:  # timm's "Unknown model (...)"
            raise FtikdError(f"timm cannot build {model_name!r}: {exc}") from None
        if weights is not None:
            load_local_weights(self.model, weights)
        taps = (
            dict(features) if features is not None else default_taps(getattr(self.model, "feature_info", []))
        )
        if "embedding" in taps:
            raise ValueError("'embedding' is the classifier input; name the other features differently")
        self.taps = taps
        for name, path in taps.items():
            try:
                self.model.get_submodule(path)
            except AttributeError:
                raise FtikdError(
                    f"timm model {model_name!r} has no module {path!r} (for feature {name!r})"
                ) from None
        classifier = self.model.get_classifier()
        self.embedding_dim: int = int(getattr(classifier, "in_features", self.model.num_features))

    def feature_names(self) -> list[str]:
        """Names present in ``features`` when ``with_features=True``: the taps, then ``embedding``."""
        return [*self.taps, "embedding"]

    def forward(self, x: torch.Tensor, with_features: bool = False) -> ModelOutput:
        if not with_features:
            return ModelOutput(self.model(x))
        # Hooks live only for this call: nothing is captured otherwise, and a deep copy of the
        # student carries no hook pointing back at the original.
        captured: dict[str, torch.Tensor] = {}

        def store_output(name: str, module: nn.Module, args: Any, output: Any) -> None:
            captured[name] = _first_tensor(output)

        def store_input(module: nn.Module, args: tuple[Any, ...]) -> None:
            emb = _first_tensor(args)
            captured["embedding"] = emb.reshape(emb.shape[0], -1)

        handles = [
            self.model.get_submodule(path).register_forward_hook(partial(store_output, name))
            for name, path in self.taps.items()
        ]
        handles.append(self.model.get_classifier().register_forward_pre_hook(store_input))
        try:
            logits = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        missing = [n for n in self.feature_names() if n not in captured]
        if missing:
            raise FtikdError(f"features {missing} were not computed by this forward (module never called)")
        return ModelOutput(logits, {n: captured[n] for n in self.feature_names()})


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, unwrapped from ``{"state_dict": ...}``/``{"model": ...}``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if state and all(k.startswith("model.") for k in state):  # saved from a TimmStudent
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state


def load_local_weights(model: nn.Module, path: str | Path) -> None:
    """Load timm weights from a local file only (never a hub), adapting them to the student.

    The first conv (timm's ``pretrained_cfg['first_conv']``) is adapted to another input channel
    count with timm's ``adapt_input_conv``; a classifier whose shape differs (another class count)
    keeps its fresh initialisation. Any other missing, unexpected or misshapen key is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FtikdError(f"weights file {path} not found (timm students load local files only)")
    state = _read_state(path)
    own = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv") or ()
    for conv in [first] if isinstance(first, str) else first:
        key = f"{conv}.weight"
        if key in state and key in own and state[key].shape[1] != own[key].shape[1]:
            state[key] = _timm().models.adapt_input_conv(own[key].shape[1], state[key])
    head = cfg.get("classifier") or ()
    head_prefixes = tuple(f"{h}." for h in ([head] if isinstance(head, str) else head))
    skipped = {
        k for k, v in state.items() if k.startswith(head_prefixes) and k in own and v.shape != own[k].shape
    }
    state = {k: v for k, v in state.items() if k not in skipped}
    bad_shapes = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad_shapes:
        raise FtikdError(f"weights in {path} do not fit the model: shapes differ for {bad_shapes[:5]}")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in skipped]
    if missing or result.unexpected_keys:
        raise FtikdError(
            f"weights in {path} do not fit the model: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def timm_student(spec: str, *, in_channels: int = 3, num_classes: int = 100) -> TimmStudent:
    """Build from a ``NAME`` or ``NAME@WEIGHTS_PATH`` spec (what follows ``timm:`` in a model name)."""
    name, _, weights = spec.partition("@")
    if not name:
        raise FtikdError(
            "a timm student is named 'timm:NAME' or 'timm:NAME@WEIGHTS_FILE', e.g. 'timm:resnet18'"
        )
    return TimmStudent(name, in_channels=in_channels, num_classes=num_classes, weights=weights or None)
