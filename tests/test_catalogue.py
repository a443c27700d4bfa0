"""The method catalogue: every method described, the README's table generated from it, and each
method's declared extra trainable modules matching what its setup really builds."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from feature_shapes import SHAPES

from ftikd.cli import main
from ftikd.methods import MethodContext, available_methods, build_method, method_class
from ftikd.methods.catalogue import catalogue, markdown_table
from ftikd.models import build_model

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- methods-table", "<!-- /methods-table -->"
C = 10


def readme_table() -> str:
    text = README.read_text()
    start = text.index("\n", text.index(BEGIN)) + 1
    return text[start : text.index(END)]


def test_readme_method_table_is_the_generated_one():
    assert readme_table() == markdown_table(catalogue()), (
        "README's method table is stale: paste the output of `ftikd methods --markdown` between its markers"
    )


def test_markdown_flag_prints_the_table(capsys):
    assert main(["methods", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown_table(catalogue())


@pytest.mark.parametrize("name", available_methods())
def test_every_method_is_described(name):
    cls = method_class(name)
    for attr in ("family", "reads", "reference", "summary"):
        assert getattr(cls, attr).strip(), f"{name} has no {attr}"
    if cls.queries_teacher or cls.name in ("vrm", "combo"):  # calls that call_cost alone cannot say
        assert cls.calls_note, f"{name} needs a calls_note"


def trainable_extras(name: str) -> int:
    """Trainable parameters of the method's extra modules once set up on a resnet8 student."""
    torch.manual_seed(0)
    method = build_method(name)
    student = build_model("resnet8", in_channels=1, num_classes=C)
    shapes = {n: SHAPES[n] for n in method.teacher_features}
    labels = torch.arange(40) % C
    # setup only asks a paid teacher for its budget and access
    paid = SimpleNamespace(budget=0, white_box=True) if method.queries_teacher else None
    ctx = MethodContext(
        40, C, 8, student, torch.device("cpu"), shapes, (1, 8, 8), labels, paid, mean=(0.5,), std=(0.25,)
    )
    method.setup(ctx)
    return sum(p.numel() for p in method.modules().parameters() if p.requires_grad)


@pytest.mark.parametrize("name", available_methods())
def test_declared_extras_match_the_modules_built(name):
    """A method declares extras exactly when its default setup adds trainable parameters."""
    assert bool(method_class(name).extras) == (trainable_extras(name) > 0)
