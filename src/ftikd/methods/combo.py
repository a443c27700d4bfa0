"""Combinations: several registered methods trained together in one run (a logit + a feature method).

Option syntax (one ``--opt``; the value is a single string, so ``parse_options`` keeps it whole)::

    --opt parts=crd+vid,vid.w_vid=1,crd.w_crd=0.8,vid.layers=stage2,stage3

The first comma item joins the part names with ``+`` (two or more distinct registered methods,
not ``combo``); every further item is ``part.option=value``, the part's own options (its weights
included), with values read as ``--opt`` reads them (bool, int, float, else text). An item
without ``=`` continues the previous value, so list options keep their commas (``stage2,stage3``
above). In a config file, pass the same string as ``method_options: {parts: "..."}``; the inline
sweep form ``combo:parts=...`` splits on commas and so takes only ``parts=crd+vid`` there.

Rules:

- One batch serves every part, so the parts must draw the same batches (checked on a small probe
  when the method is built, and again with the run's sizes when training starts); ``ckd+vid``
  (groups vs single samples) is refused: white-box CKD is ``vid-ckd`` / ``fitnets-ckd``.
- Per-sample CE (``w_ce``) and Hinton KD (``w_kd``) on the batch are counted once: each stays in
  the first part that gives it a positive weight and is set to 0 in the later parts. Setting it
  explicitly (> 0) on a later part while an earlier part holds it is an error naming the holder
  (``crd+vid``: CE 1 + KD 1 from crd, vid's are 0; ``at+kd``: CE from at, KD from kd). The
  method ``ce`` holds CE at weight 1 (``ce+kd`` is ``kd``). Where ``w_ce`` also weighs other
  classifiers (dml's peers, one's branches), put that method first, or they lose their CE.
- The store keeps the union of the parts' teacher features; ``call_cost`` is the parts' maximum,
  ``couples_batch_rows`` (and ``leaves_student_parameters_unused``) true if any part's is.
- Each part's extra modules live under ``extra[part]``; its loss terms are named ``part.term``.
- The student is forwarded once per distinct input per step: parts get a :class:`SharedForward`
  that returns the same output for the same images tensor (with all named features when any part
  reads teacher features), so crd+vid or kd+at cost one forward, not two.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ftikd.errors import FtikdError
from ftikd.methods.base import Batch, Method, MethodConfig, MethodContext, build_method, register_method
from ftikd.methods.samplers import IndexSampler
from ftikd.models.base import ModelOutput
from ftikd.options import parse_value

SHARED_WEIGHTS = {"w_ce": "CE", "w_kd": "KD"}  # per-sample terms on the same batch: counted once
IMPLICIT_WEIGHTS = {"ce": "w_ce"}  # methods whose whole loss is one shared term, at weight 1
WHITEBOX_CKD = {"fitnets": "fitnets-ckd", "vid": "vid-ckd"}
PROBE = (24, 6, 3)  # samples, batch size, batches drawn when probing a part's sampler at build time
SYNTAX = "parts=NAME+NAME[,NAME.OPTION=VALUE...], e.g. parts=crd+vid,vid.w_vid=1"


def parse_parts(spec: str) -> dict[str, dict[str, Any]]:
    """``"crd+vid,vid.w_vid=1"`` -> ``{"crd": {}, "vid": {"w_vid": 1}}`` (part order kept)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"combo needs {SYNTAX}")
    head, *items = (item.strip() for item in spec.split(","))
    names = [name.strip() for name in head.split("+")]
    if "=" in head or len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise ValueError(f"parts must start with two or more distinct method names joined by '+': {SYNTAX}")
    if "combo" in names:
        raise ValueError("a combo cannot contain another combo")
    raw: dict[str, dict[str, str]] = {name: {} for name in names}
    last: tuple[str, str] | None = None
    for item in items:
        if "=" not in item:
            if last is None:
                raise ValueError(f"part option {item!r} must look like part.option=value ({SYNTAX})")
            raw[last[0]][last[1]] += "," + item
            continue
        key, _, value = item.partition("=")
        part, dot, option = key.strip().partition(".")
        if not dot or not option:
            raise ValueError(f"part option {item!r} must look like part.option=value ({SYNTAX})")
        if part not in raw:
            raise ValueError(f"option {key.strip()!r} names no part; the parts are {', '.join(names)}")
        if option in raw[part]:
            raise ValueError(f"option {key.strip()!r} is given twice")
        raw[part][option] = value.strip()
        last = (part, option)
    return {name: {k: parse_value(v) for k, v in opts.items()} for name, opts in raw.items()}


def build_part(name: str, options: dict[str, Any]) -> Method:
    """One part through the registry; its user errors become one line naming the part."""
    try:
        return build_method(name, **options)
    except FtikdError as exc:
        raise ValueError(f"part {name!r}: {exc}") from None


def shared_weight(name: str, part: Method, weight: str) -> float | None:
    """The part's weight of a shared term (None: it has no such term); ``ce`` holds CE implicitly at 1."""
    if IMPLICIT_WEIGHTS.get(name) == weight:
        return 1.0
    if weight not in {f.name for f in dataclasses.fields(part.config)}:
        return None
    return float(getattr(part.config, weight))


def build_parts(spec: dict[str, dict[str, Any]]) -> dict[str, Method]:
    """The parts, with CE and KD kept in the first part that weighs them > 0 and zeroed after it."""
    parts = {name: build_part(name, options) for name, options in spec.items()}
    resolved = {name: dict(options) for name, options in spec.items()}
    for weight, term in SHARED_WEIGHTS.items():
        holder = None
        for name, part in parts.items():
            if not shared_weight(name, part, weight):
                continue
            if holder is None:
                holder = name
            elif spec[name].get(weight) or IMPLICIT_WEIGHTS.get(name) == weight:
                fix = f"drop part {name}" if name in IMPLICIT_WEIGHTS else f"drop {name}.{weight}"
                raise ValueError(
                    f"{term} is counted once, in part {holder!r}: {fix} or set {holder}.{weight}=0"
                )
            else:
                resolved[name][weight] = 0.0
    return {
        name: part if resolved[name] == spec[name] else build_part(name, resolved[name])
        for name, part in parts.items()
    }


def draw_batches(
    method: Method, num: int, batch_size: int, generator: torch.Generator, count: int
) -> tuple[str, tuple[torch.Tensor, ...]]:
    """The first ``count`` index batches of ``method``'s sampler built from ``generator``, and words
    for them (single samples or groups of k, and the sampler's class)."""
    sampler = method.sampler(num, batch_size, generator)
    batches = tuple(sampler.next_batch() for _ in range(count))
    shape = "single samples" if batches[0].dim() == 1 else f"groups of {batches[0].shape[-1]}"
    return f"{shape}, {type(sampler).__name__}", batches


def check_same_batches(drawn: dict[str, tuple[str, tuple[torch.Tensor, ...]]]) -> None:
    """Refuse parts whose samplers drew different index batches from the same generator state."""
    (first, (kind, ref)), *rest = drawn.items()
    for name, (other_kind, batches) in rest:
        if all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(ref, batches, strict=True)):
            continue
        feature = next((n for n in (first, name) if n in WHITEBOX_CKD), None)
        hint = ""
        if feature and "ckd" in (first, name):
            hint = f"; for CKD on {feature} features use --method {WHITEBOX_CKD[feature]}"
        raise ValueError(
            f"parts {first!r} ({kind}) and {name!r} ({other_kind}) draw different batches, so one step "
            f"cannot serve both{hint}"
        )


def probe_samplers(parts: dict[str, Method]) -> None:
    """Build-time sampler check on a small problem; parts whose sampler needs the run's data
    (e.g. rkd's class sampler needs the labels from setup) are checked when training starts."""
    num, batch_size, count = PROBE
    drawn = {}
    for name, part in parts.items():
        try:
            drawn[name] = draw_batches(part, num, batch_size, torch.Generator().manual_seed(0), count)
        except (FtikdError, ValueError):  # needs the run's data or sizes: checked by Combo.sampler
            continue
    if len(drawn) > 1:
        check_same_batches(drawn)


def tensor_key(x: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensors the same values in memory: storage address, layout and version.

    The memo keeps each keyed tensor alive, so its memory cannot pass to another tensor within the
    step; the version counter catches an in-place change.
    """
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)


class SharedForward:
    """The student as the parts see it during one step: one forward per distinct images tensor.

    Called like the student (``student(x)`` or ``student(x, with_features=True)``); the first call
    on a tensor forwards the student (with features when ``with_features`` is set here or asked),
    later calls on the same tensor return that output. Attributes are the student's.
    """

    def __init__(self, student: nn.Module, with_features: bool) -> None:
        self.student, self.with_features = student, with_features
        self.memo: list[tuple[tuple[Any, ...], torch.Tensor, ModelOutput]] = []

    def __call__(self, images: torch.Tensor, with_features: bool = False) -> ModelOutput:
        key = tensor_key(images)
        for seen, _, out in self.memo:
            if seen == key and (out.features or not with_features):
                return out
        if with_features or self.with_features:
            out = self.student(images, with_features=True)
        else:
            out = self.student(images)
        self.memo.append((key, images, out))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.student, name)


@dataclass
class ComboConfig(MethodConfig):
    """``parts``: the part names and their options, see the module docstring. The default
    (crd+vid, the CKD paper's logit CRD with VID's hints) makes ``combo`` buildable without options,
    as every method is (``ftikd bench --methods all``)."""

    parts: str = "crd+vid"

    def __post_init__(self) -> None:
        parse_parts(self.parts)


@register_method
class Combo(Method):
    name = "combo"
    calls_note = "the parts' maximum"
    family = "combination"
    reads = "what its parts read"
    extras = "its parts' (default crd+vid: CRD heads and bank, VID heads)"
    summary = (
        "Several methods on one shared student forward, e.g. --opt parts=kd+at,at.w_at=100 "
        "(default crd+vid); CE and KD counted once"
    )
    reference = "ftikd"
    Config = ComboConfig

    def __init__(self, config: ComboConfig | None = None) -> None:
        super().__init__(config)
        self.parts = build_parts(parse_parts(self.config.parts))
        probe_samplers(self.parts)
        for name, part in self.parts.items():
            self.extra[name] = part.extra
        parts = self.parts.values()
        self.teacher_features = tuple(dict.fromkeys(f for p in parts for f in p.teacher_features))
        self.call_cost = max(p.call_cost for p in parts)
        self.couples_batch_rows = any(p.couples_batch_rows for p in parts)
        self.wants_features = bool(self.teacher_features)

    @property
    def leaves_student_parameters_unused(self) -> bool:
        return any(p.leaves_student_parameters_unused for p in self.parts.values())

    def setup(self, ctx: MethodContext) -> None:
        """Each part builds its extra modules (into its own ``extra``, registered under its name)."""
        for part in self.parts.values():
            part.setup(ctx)

    def sampler(self, num_train: int, batch_size: int, generator: torch.Generator) -> IndexSampler:
        """The first part's sampler, after checking with the run's sizes that every part draws the same."""
        state = generator.get_state()
        drawn = {
            name: draw_batches(
                part, num_train, batch_size, torch.Generator(device=generator.device).set_state(state), 2
            )
            for name, part in self.parts.items()
        }
        try:
            check_same_batches(drawn)
        except ValueError as exc:
            raise FtikdError(f"method 'combo': {exc}") from None
        return next(iter(self.parts.values())).sampler(num_train, batch_size, generator)

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        shared = SharedForward(student, self.wants_features)
        return {
            f"{name}.{term}": value
            for name, part in self.parts.items()
            for term, value in part.loss(shared, batch).items()  # type: ignore[arg-type]
        }

    def evaluate_extra(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        batch_size: int = 1000,
    ) -> dict[str, float]:
        """Each part's extra test metrics, prefixed with the part's name."""
        return {
            f"{name}.{key}": value
            for name, part in self.parts.items()
            for key, value in part.evaluate_extra(images, labels, mean, std, batch_size).items()
        }

    def describe(self) -> dict[str, Any]:
        """The combo's option string and each part's resolved options (CE/KD zeroing included)."""
        return {
            "name": self.name,
            "parts": self.config.parts,
            "components": {n: p.describe() for n, p in self.parts.items()},
        }
