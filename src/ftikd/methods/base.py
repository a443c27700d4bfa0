"""The Method interface and the method registry.

A method declares what it needs from the teacher (logits, named features), its teacher-call cost
per training sample, its extra trainable modules, how it builds batches (a sampler of index
tensors) and its named loss terms. The engine knows nothing about any particular method: adding
one means writing one file with a registered subclass (DESIGN.md, "The seams").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ftikd.errors import FtikdError
from ftikd.methods.samplers import IndexSampler, ShuffledSampler
from ftikd.models.base import ModelOutput

if TYPE_CHECKING:
    from ftikd.teacher.oracle import PaidTeacher


@dataclass
class Batch:
    """One training step's data, already on the training device.

    ``index`` holds positions into the run's training subset, shaped (B,) for plain batches or
    (B, k) for group samplers; ``images`` (augmented, normalised), ``labels``, ``teacher_logits``
    and each entry of ``teacher_features`` carry the same leading shape.
    """

    index: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    teacher_logits: torch.Tensor | None = None
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)

    def onehot(self) -> torch.Tensor:
        """Labels as float one-hot vectors, shape ``labels.shape + (C,)``."""
        return F.one_hot(self.labels, self.num_classes).float()


@dataclass
class MethodContext:
    """What a method may know when it builds its extra modules and sampler."""

    num_train: int
    num_classes: int
    batch_size: int
    student: nn.Module
    device: torch.device
    teacher_feature_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None
    train_labels: torch.Tensor | None = None  # labels of the training subset (n,), for class-aware samplers
    paid_teacher: PaidTeacher | None = None  # teacher calls on new inputs; set only when queries_teacher
    mean: tuple[float, ...] | None = None  # the dataset's per-channel normalisation of batch images
    std: tuple[float, ...] | None = None


@dataclass
class MethodConfig:
    """Base class of every method's options; subclasses add fields with defaults."""


class Method:
    """Base class of a distillation method; subclasses register with :func:`register_method`.

    Class attributes a subclass sets:
      ``name``, ``summary`` (one line for ``ftikd methods``), ``reference`` (paper);
      ``family`` (logit, relational, feature, ...), ``reads`` (what its loss compares, at the default
      options), ``extras`` (its extra trainable modules at the defaults, "" for none) and
      ``calls_note`` (teacher calls when ``call_cost`` alone does not say it): the catalogue
      (:mod:`ftikd.methods.catalogue`) that ``ftikd methods`` and the README's method table print;
      ``call_cost``: teacher calls per training sample (0: no teacher, 1: one cached call);
      ``teacher_features``: names of teacher features the method reads from the store;
      ``couples_batch_rows``: True when the loss compares rows of a batch with each other, so that
      data-parallel ranks (each holding a slice of the batch) optimise a different objective;
      ``phase_end_keeps``: name prefixes of extra-module state entries that a phase end does not
      restore from the best checkpoint (non-trainable loss state, e.g. CRD's memory bank: A11);
      ``queries_teacher``: True when the method calls the teacher on new inputs during training
      (through ``MethodContext.paid_teacher``), spending what :meth:`train_samples` leaves of n;
      ``Config``: the options dataclass.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    family: ClassVar[str] = ""
    reads: ClassVar[str] = ""
    extras: ClassVar[str] = ""
    calls_note: ClassVar[str] = ""
    call_cost: ClassVar[int] = 1
    teacher_features: ClassVar[tuple[str, ...]] = ()
    couples_batch_rows: ClassVar[bool] = False
    queries_teacher: ClassVar[bool] = False
    phase_end_keeps: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()
        self.extra = nn.ModuleDict()

    def train_samples(self, calls: int) -> int:
        """How many of the budget's ``calls`` go to cached training samples; a method that queries the
        teacher during training spends the rest through ``MethodContext.paid_teacher`` (default: all)."""
        return calls

    def setup(self, ctx: MethodContext) -> None:
        """Build extra trainable modules into ``self.extra`` (default: none)."""

    def modules(self) -> nn.ModuleDict:
        """Extra trainable modules: optimised, checkpointed and restored with the student."""
        return self.extra

    def sampler(self, num_train: int, batch_size: int, generator: torch.Generator) -> IndexSampler:
        """Index batches for each step; default: shuffled single samples."""
        return ShuffledSampler(num_train, batch_size, generator)

    def loss(self, student: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Weighted loss terms of one step; the engine minimises their sum."""
        raise NotImplementedError

    @property
    def needs_teacher(self) -> bool:
        return self.call_cost > 0

    @property
    def leaves_student_parameters_unused(self) -> bool:
        """True when some steps give part of the student no gradient (e.g. a hint-only first stage);
        data-parallel training must then look for unused parameters."""
        return False

    def evaluate_extra(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        batch_size: int = 1000,
    ) -> dict[str, float]:
        """Test metrics of classifiers the method trains beside the student (DML's peers, ONE's
        branches), for the run record; default: none."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The method's name and options, for run records."""
        return {"name": self.name, **dataclasses.asdict(self.config)}


def forward_student(student: nn.Module, images: torch.Tensor, with_features: bool = False) -> ModelOutput:
    """Run the student on images of shape (..., C, H, W), restoring the leading shape on logits.

    With ``with_features`` the named features come back too (flat over the leading dims).
    """
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    out = student(flat, with_features=True) if with_features else student(flat)
    return ModelOutput(out.logits.reshape(*lead, -1), out.features)


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a Method subclass to the registry under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise FtikdError(f"unknown method {name!r}; choose one of: {', '.join(available_methods())}")
    return _REGISTRY[name]


def build_method(name: str, **options: Any) -> Method:
    """Instantiate a registered method, overriding its Config fields by keyword."""
    cls = method_class(name)
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(options) - known)
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise FtikdError(f"method {name!r} has no option(s) {', '.join(unknown)}; its options are: {valid}")
    try:
        return cls(cls.Config(**options))
    except (TypeError, ValueError) as exc:
        raise FtikdError(f"bad option for method {name!r}: {exc}") from None
