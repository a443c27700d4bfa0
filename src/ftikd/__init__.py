"""ftikd: knowledge distillation when teacher calls are scarce."""

__version__ = "0.1.0"
