"""ftikd: knowledge distillation when teacher calls are scarce.

The main entry points: :func:`run_distillation` with a :class:`RunConfig` for one budgeted run,
:class:`Teacher` to wrap any teacher (module, checkpoint, or a callable standing for a paid API),
and :class:`TeacherStore`, the durable, budgeted cache every teacher output goes through.
"""

__version__ = "0.1.0"

from ftikd.data import ImageDataset, fti_split, load_dataset  # noqa: E402
from ftikd.engine.trainer import TrainConfig  # noqa: E402
from ftikd.errors import BudgetExceededError, FtikdError  # noqa: E402
from ftikd.experiments.run import RunConfig, RunResult, run_distillation  # noqa: E402
from ftikd.methods import Method, available_methods, build_method, register_method  # noqa: E402
from ftikd.models import ModelOutput, available_models, build_model, register_model  # noqa: E402
from ftikd.teacher import Teacher, TeacherOutput, TeacherStore, as_teacher  # noqa: E402

__all__ = [
    "BudgetExceededError",
    "FtikdError",
    "ImageDataset",
    "Method",
    "ModelOutput",
    "RunConfig",
    "RunResult",
    "Teacher",
    "TeacherOutput",
    "TeacherStore",
    "TrainConfig",
    "__version__",
    "as_teacher",
    "available_methods",
    "available_models",
    "build_method",
    "build_model",
    "fti_split",
    "load_dataset",
    "register_method",
    "register_model",
    "run_distillation",
]
