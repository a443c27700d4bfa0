"""Teachers, their checkpoints, and the durable store through which teacher outputs reach training."""

from ftikd.teacher.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from ftikd.teacher.fingerprint import state_fingerprint
from ftikd.teacher.store import TeacherStore
from ftikd.teacher.teacher import Teacher, TeacherOutput, as_teacher

__all__ = [
    "Teacher",
    "TeacherOutput",
    "TeacherStore",
    "as_teacher",
    "load_checkpoint",
    "read_checkpoint_meta",
    "save_checkpoint",
    "state_fingerprint",
]
