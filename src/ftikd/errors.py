"""User-facing errors.

A :class:`FtikdError` is a mistake the user can fix (bad path, unknown name, impossible budget,
corrupt file). Its message is one line that names the fix. The CLI prints it without a traceback and
exits non-zero; programming errors are left to raise normally.
"""


class FtikdError(Exception):
    """A user error whose message is a single line naming the fix."""


class BudgetExceededError(FtikdError):
    """Paying for the requested teacher outputs would exceed the teacher-call budget."""
