"""The method catalogue: one row per registered method, for ``ftikd methods`` and the README.

Every column comes from the method's class attributes (``family``, ``reads``, ``extras``,
``call_cost`` / ``calls_note``, ``teacher_features``, ``reference``, ``summary``), so a new method
file appears in the listing and in the README's table (``ftikd methods --markdown``) without any
hand-written row. ``reads`` gains a note when the method takes an ``on`` option (logits by default,
the original papers' embedding or feature maps one option away).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ftikd.methods.base import Method, available_methods, method_class
from ftikd.methods.representation import LOGITS

COLUMNS = ("method", "family", "reads", "extra trainable modules", "teacher calls", "paper", "what it does")


@dataclass(frozen=True)
class MethodCard:
    """What a user needs to pick a method: the catalogue row of one registered method."""

    name: str
    family: str
    reads: str
    extras: str
    calls: str
    paper: str
    summary: str

    def cells(self) -> tuple[str, ...]:
        return (self.name, self.family, self.reads, self.extras or "-", self.calls, self.paper, self.summary)


def calls_text(cls: type[Method]) -> str:
    """Teacher calls per training sample, as the store counts them."""
    if cls.calls_note:
        return cls.calls_note
    return "0 (no teacher)" if cls.call_cost == 0 else f"{cls.call_cost} per sample, cached"


def reads_text(cls: type[Method]) -> str:
    """``reads``, plus the other values of the ``on`` option where the method has one."""
    if "on" not in {f.name for f in dataclasses.fields(cls.Config)}:
        return cls.reads
    if cls.Config().on == LOGITS:
        return f"{cls.reads} (`on=embedding` or a feature map: the original papers')"
    return f"{cls.reads} (`on=logits`: the CKD paper's black-box setting; or a feature map)"


def method_card(name: str) -> MethodCard:
    cls = method_class(name)
    return MethodCard(
        name, cls.family, reads_text(cls), cls.extras, calls_text(cls), cls.reference, cls.summary
    )


def catalogue() -> list[MethodCard]:
    """Every registered method's card, by name."""
    return [method_card(name) for name in available_methods()]


def markdown_table(cards: list[MethodCard]) -> str:
    """The README's method table (pipes inside a cell escaped)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for card in cards:
        cells = [c.replace("|", "\\|") for c in card.cells()]
        cells[0] = f"`{cells[0]}`"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
