"""Fuzz and property tests of the run-config reader (JSON/YAML syntax, keys, types, odd structures).

Shared harness and the rules every reader must keep: tests/fuzzing.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest
from fuzzing import (
    TRIED,
    attempt,
    fuzz,
    json_leaf,
    scratch,
)
from hypothesis import assume, given
from hypothesis import strategies as st

from ftikd.errors import FtikdError
from ftikd.experiments.config_check import check_run_config
from ftikd.experiments.run import RunConfig

# ----------------------------------------------------------------------------- run configs / records

_config_text = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=80).map(str.encode),
    st.sampled_from(
        [
            b"{",
            b"[1, 2]",
            b"null",
            b'"text"',
            b"5",
            b"- a\n- b\n",
            b"a: [\n",
            b"{a: 1",
            b"\xff\xfe{}",
            b"\x00" * 5,
        ]
    ),
    # keys without control characters: from_dict prints unknown keys raw (see the newline-key case below)
    st.dictionaries(
        st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=8), json_leaf, max_size=4
    ).map(lambda d: json.dumps(d).encode()),
)


@fuzz(120)
@given(content=_config_text, suffix=st.sampled_from([".json", ".yaml", ".yml", ".cfg"]))
def test_fuzz_run_config_syntax(fuzz_base: Path, content: bytes, suffix: str) -> None:
    """Random bytes, broken JSON/YAML, non-mapping roots, unknown keys and non-UTF-8 text."""
    with scratch(fuzz_base) as d:
        p = d / f"c{suffix}"
        p.write_bytes(content)
        try:
            # from_dict prints unknown keys raw (a key may hold a newline) until check_run_config is wired
            cfg = attempt("config", lambda: RunConfig.from_file(p), one_line=WIRED)
        except (TypeError, ValueError, AttributeError):
            # a mapping with wrong value types escapes until from_dict calls check_run_config
            if WIRED:
                raise
            assume(False)
    if cfg is not None:
        assert isinstance(cfg, RunConfig)


# Whether RunConfig.from_dict already calls the validator (then nothing may escape at all).
WIRED = "check_run_config" in inspect.getsource(RunConfig.from_dict)
_RC_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(RunConfig().train)}

_WRONG_TYPES = {
    "calls": ["abc", 2.5, True, None, [1], {"a": 1}],
    "seed": ["1", 1.0, False],
    "view": ["0", None],
    "train": [5, "abc", [1, 2], True],
    "method_options": [[], "k=3", 5, {1: 2}],
    "dataset": [5, None, ["cifar10"]],
    "student": [None, 3],
    "method": [1.5, {}],
    "teacher": [5, ["a"]],
    "data_dir": [1],
    "store": [True],
    "out": [None, 0],
}
_WRONG_TRAIN = {"lr": ["0.1", None, float("nan")], "batch_size": [64.0, "64", True], "device": [0, None]}
_WRONG_CASES = [({k: v}, k) for k, vs in _WRONG_TYPES.items() for v in vs] + [
    ({"train": {k: v}}, f"train.{k}") for k, vs in _WRONG_TRAIN.items() for v in vs
]


def _write_config(d: Path, raw: dict[str, Any], yaml_file: bool) -> Path:
    if yaml_file:
        import yaml

        p = d / "c.yaml"
        p.write_text(yaml.safe_dump(raw))
    else:
        p = d / "c.json"
        p.write_text(json.dumps(raw))
    return p


def _has_int_keys(obj: Any) -> bool:
    return isinstance(obj, dict) and any(not isinstance(k, str) or _has_int_keys(v) for k, v in obj.items())


# JSON turns integer keys into strings (a valid config), so those cases are YAML-only.
_FILE_CASES = [
    pytest.param(raw, key, yaml_file, id=f"{'yaml' if yaml_file else 'json'}-{key}={raw!r}")
    for raw, key in _WRONG_CASES
    for yaml_file in (False, True)
    if yaml_file or not _has_int_keys(raw)
]


@pytest.mark.parametrize("raw,key", _WRONG_CASES, ids=[f"{key}={raw!r}" for raw, key in _WRONG_CASES])
def test_check_run_config_names_key_and_type(raw: dict[str, Any], key: str) -> None:
    """The validator itself (no wiring needed): every wrong type is refused naming the key."""
    TRIED["config_check"] += 1
    with pytest.raises(FtikdError, match=re.escape(repr(key)) + " must be"):
        check_run_config(raw, RunConfig, "c.json")
    with pytest.raises(FtikdError, match=re.escape(repr(key))):
        check_run_config({"config": raw, "metrics": {}}, RunConfig, "record.json")  # a run record


_typed_values = st.one_of(
    json_leaf, st.lists(json_leaf, max_size=2), st.dictionaries(st.text(max_size=3), json_leaf, max_size=2)
)


@fuzz(150)
@given(
    raw=st.dictionaries(
        st.one_of(st.sampled_from(sorted(_RC_FIELDS)), st.text(max_size=6)),
        st.one_of(
            _typed_values, st.dictionaries(st.sampled_from(sorted(_TRAIN_FIELDS)), _typed_values, max_size=3)
        ),
        max_size=5,
    )
)
def test_fuzz_check_run_config(raw: dict[str, Any]) -> None:
    """Whatever check_run_config accepts builds a RunConfig whose fields all have their types."""
    cleaned = attempt("config_check", lambda: check_run_config(raw, RunConfig))
    if cleaned is None:
        return
    train = cleaned.pop("train", None) or {}
    cfg = RunConfig(**cleaned, train=type(RunConfig().train)(**train))
    for name, tp in ((f.name, f.type) for f in dataclasses.fields(cfg)):
        value = getattr(cfg, name)
        if name == "train":
            for tf in dataclasses.fields(value):
                v = getattr(value, tf.name)
                if tf.type == "bool":
                    assert type(v) is bool, (tf.name, v)
                    continue
                want = {"int": int, "float": (int, float), "str": str}[tf.type]
                assert isinstance(v, want) and not isinstance(v, bool), (tf.name, v)
        elif tp == "int":
            assert type(value) is int, (name, value)
        elif tp == "str":
            assert isinstance(value, str), (name, value)
        elif tp == "str | None":
            assert value is None or isinstance(value, str), (name, value)
        elif tp == "dict[str, Any]":
            assert isinstance(value, dict) and all(isinstance(k, str) for k in value), (name, value)


@pytest.mark.parametrize("raw,key,yaml_file", _FILE_CASES)
def test_run_config_wrong_types_refused(
    tmp_path: Path, raw: dict[str, Any], key: str, yaml_file: bool
) -> None:
    """After RunConfig.from_dict calls check_run_config, wrong types end in FtikdError naming the key."""
    p = _write_config(tmp_path, raw, yaml_file)
    TRIED["config"] += 1
    with pytest.raises(FtikdError, match=re.escape(repr(key))):
        RunConfig.from_file(p)


@pytest.mark.parametrize(
    "text",
    [
        '{"config": 5}',
        '{"config": [1, 2]}',
        '{"config": "ab"}',
        "1: 2\nseed: 3\n",
        '{"train": [["lr", 1]]}',
        '{"\\n": 1}',  # an unknown key holding a newline must not break the one-line message
    ],
)
def test_run_config_odd_structures_refused(tmp_path: Path, text: str) -> None:
    """A record whose 'config' is not a mapping, YAML integer keys, a list as train block, odd keys."""
    p = tmp_path / ("c.yaml" if ":" in text and not text.startswith("{") else "c.json")
    p.write_text(text)
    TRIED["config"] += 1
    attempt("config", lambda: RunConfig.from_file(p))
