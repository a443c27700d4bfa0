"""Fuzz and property tests of the teacher store: tampered databases and files, non-finite outputs.

Shared harness and the rules every reader must keep: tests/fuzzing.py.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzzing import (
    TRIED,
    Blob,
    attempt,
    fuzz,
    scratch,
)
from hypothesis import assume, given
from hypothesis import strategies as st

from ftikd.errors import FtikdError
from ftikd.teacher import TeacherStore

# ------------------------------------------------------------------------------------ teacher store

SC = 5  # classes
SN = 12  # samples
FP = "fuzz-teacher-v1"


def _images(ids: torch.Tensor) -> torch.Tensor:
    x = torch.zeros(ids.numel(), 1, 2, 2)
    x[:, 0, 0, 0] = ids.float()
    return x


def _teacher_out(x: torch.Tensor) -> dict[str, torch.Tensor]:
    ids = x[:, 0, 0, 0]
    logits = ids[:, None] * 0.5 + torch.arange(SC, dtype=torch.float32)
    return {"logits": logits, "emb": torch.stack([ids, -ids, ids * 2], dim=1)}


def _expected_logits() -> torch.Tensor:
    return _teacher_out(_images(torch.arange(SN)))["logits"]


@pytest.fixture(scope="module")
def store_bytes(fuzz_base: Path) -> bytes:
    p = fuzz_base / "good.sqlite"
    with TeacherStore.open(p, FP, "toy", SC, feature_names=("emb",)) as s:
        s.fill(torch.arange(SN), 0, _images, _teacher_out, budget=SN, batch_size=5)
    assert not Path(str(p) + "-wal").exists() or Path(str(p) + "-wal").stat().st_size == 0
    return Blob(p.read_bytes())


def read_store(p: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Everything a run reads from a store: open, missing, counts, logits and features."""
    with TeacherStore.open(p, FP, "toy", SC) as s:
        s.missing(torch.arange(SN), 0)
        s.count(0), s.paid_calls(), s.ledger()
        logits = s.logits(torch.arange(SN), 0)
        feats = s.features(torch.arange(SN), 0, "emb")
    assert logits.dtype == torch.float32 and tuple(logits.shape) == (SN, SC)
    assert feats.dtype == torch.float32 and tuple(feats.shape) == (SN, 3)
    return logits, feats


_TAMPER = [
    "blob_len",
    "blob_swap",
    "blob_type",
    "sample_type",
    "feature_len",
    "meta",
    "meta_delete",
    "drop_table",
    "schema",
    "delete_rows",
]


def tamper(p: Path, kind: str, draw: Callable[[st.SearchStrategy[Any]], Any]) -> bool:
    """Damage a valid store through SQLite; True when the damage must be reported on read."""
    con = sqlite3.connect(p)
    sample = draw(st.integers(0, SN - 1))
    try:
        if kind == "blob_len":
            n = draw(st.integers(0, 60).filter(lambda k: k != 4 * SC))
            con.execute("UPDATE outputs SET logits=? WHERE sample=?", (bytes(n), sample))
            return True
        if kind == "blob_swap":  # one blob 4 bytes short, another 4 bytes long: same total size
            other = (sample + 1 + draw(st.integers(0, SN - 2))) % SN
            con.execute("UPDATE outputs SET logits=substr(logits, 1, ?) WHERE sample=?", (4 * SC - 4, sample))
            con.execute("UPDATE outputs SET logits=logits || zeroblob(4) WHERE sample=?", (other,))
            return True
        if kind == "blob_type":
            value = draw(
                st.one_of(st.text(max_size=30), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False))
            )
            con.execute("UPDATE outputs SET logits=? WHERE sample=?", (value, sample))
            return True
        if kind == "sample_type":
            name = draw(st.text("abcxyz", min_size=1, max_size=5))  # never numeric: stays TEXT
            con.execute("UPDATE outputs SET sample=? WHERE sample=?", (name, sample))
            return True
        if kind == "feature_len":
            n = draw(st.integers(0, 30).filter(lambda k: k != 12))
            con.execute("UPDATE features SET data=? WHERE sample=?", (bytes(n), sample))
            return True
        if kind == "meta":
            key = draw(
                st.sampled_from(
                    [
                        "num_classes",
                        "feature_names",
                        "feature_shapes",
                        "format_version",
                        "max_calls",
                        "fingerprint",
                        "dataset",
                    ]
                )
            )
            value = draw(
                st.one_of(
                    st.text(max_size=12),
                    st.sampled_from(
                        ["[]", "[1]", "5", "{}", '{"emb": [3.5]}', '{"emb": "x"}', "-1", "0", "null"]
                    ),
                )
            )
            con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))
            return False
        if kind == "meta_delete":
            con.execute(
                "DELETE FROM meta WHERE key=?",
                (draw(st.sampled_from(["num_classes", "feature_names", "feature_shapes", "fingerprint"])),),
            )
            return True
        if kind == "drop_table":
            con.execute(f"DROP TABLE {draw(st.sampled_from(['meta', 'outputs', 'features', 'ledger']))}")
            return True
        if kind == "schema":
            table = draw(st.sampled_from(["outputs", "features", "ledger", "meta"]))
            con.execute(f"ALTER TABLE {table} RENAME TO old_{table}")
            con.execute(f"CREATE TABLE {table} (a, b)")
            return True
        con.execute("DELETE FROM outputs WHERE sample=?", (sample,))
        return True
    finally:
        con.commit()
        con.close()


@fuzz(100)
@given(data=st.data())
def test_fuzz_store_tampered_through_sqlite(fuzz_base: Path, store_bytes: bytes, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(_TAMPER))
    with scratch(fuzz_base) as d:
        p = d / "s.sqlite"
        p.write_bytes(store_bytes)
        must_fail = tamper(p, kind, data.draw)
        out = attempt("store", lambda: read_store(p))
        if kind in ("blob_len", "blob_swap", "blob_type", "feature_len"):  # the error names the store
            with pytest.raises(FtikdError, match=re.escape(str(p))):
                read_store(p)
    if must_fail:
        assert out is None, f"{kind}: damaged store read without error"
    elif out is not None:
        assert torch.equal(out[0], _expected_logits())


@fuzz(80)
@given(data=st.data())
def test_fuzz_store_file_bytes(fuzz_base: Path, store_bytes: bytes, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["random", "magic_random", "truncate", "flip", "foreign"]))
    with scratch(fuzz_base) as d:
        p = d / "s.sqlite"
        if kind == "random":
            p.write_bytes(data.draw(st.binary(min_size=1, max_size=4096)))
        elif kind == "magic_random":
            p.write_bytes(b"SQLite format 3\x00" + data.draw(st.binary(max_size=4096)))
        elif kind == "truncate":
            p.write_bytes(store_bytes[: data.draw(st.integers(1, len(store_bytes) - 1))])
        elif kind == "flip":
            buf = bytearray(store_bytes)
            for at in data.draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=6)):
                buf[at] ^= 1 << data.draw(st.integers(0, 7))
            p.write_bytes(bytes(buf))
        else:  # a valid SQLite database that is not a store (some store table names, wrong columns)
            con = sqlite3.connect(p)
            for t in data.draw(
                st.lists(st.sampled_from(["meta", "outputs", "features", "ledger", "x"]), unique=True)
            ):
                con.execute(f"CREATE TABLE {t} (a, b)")
            con.commit()
            con.close()
        out = attempt("store", lambda: read_store(p))
    if out is not None and kind == "truncate":
        # truncation removes bytes but cannot change them: whatever is read must be the true values
        assert torch.equal(out[0], _expected_logits())


def test_store_wrong_blob_length_names_the_store(tmp_path: Path, store_bytes: bytes) -> None:
    p = tmp_path / "s.sqlite"
    p.write_bytes(store_bytes)
    con = sqlite3.connect(p)
    con.execute("UPDATE outputs SET logits=zeroblob(8) WHERE sample=3")
    con.commit()
    con.close()
    TRIED["store"] += 1
    with TeacherStore.open(p, FP, "toy", SC) as s:
        assert torch.equal(s.logits(torch.tensor([0, 1]), 0), _expected_logits()[:2])  # other rows still read
        with pytest.raises(
            FtikdError, match=re.escape(f"store {p} is not a valid") + ".*sample 3 has 8 bytes"
        ):
            s.logits(torch.arange(SN), 0)


# ------------------------------------------------------------------------ teacher outputs: NaN/inf


@fuzz(30)
@given(
    n=st.integers(1, 12),
    batch=st.integers(1, 5),
    bad=st.lists(
        st.tuples(
            st.integers(0, 11), st.integers(0, SC - 1), st.sampled_from([math.nan, math.inf, -math.inf])
        ),
        min_size=1,
        max_size=4,
    ),
    in_features=st.booleans(),
)
def test_fuzz_non_finite_teacher_outputs_refused(
    fuzz_base: Path, n: int, batch: int, bad: list[tuple[int, int, float]], in_features: bool
) -> None:
    bad = [(s, c, v) for s, c, v in bad if s < n]
    assume(bad)
    first_bad_batch = min(s for s, _, _ in bad) // batch
    calls: list[list[int]] = []

    def teacher(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = _teacher_out(x)
        ids = x[:, 0, 0, 0].long().tolist()
        calls.append(ids)
        target = out["emb"] if in_features else out["logits"]
        for s, c, v in bad:
            if s in ids:
                target[ids.index(s), c % target.shape[1]] = v
        return out

    with (
        scratch(fuzz_base) as d,
        TeacherStore.open(d / "s.sqlite", FP, "toy", SC, feature_names=("emb",)) as s,
    ):
        TRIED["teacher_output"] += 1
        with pytest.raises(FtikdError, match=r"non-finite .*nothing was stored"):
            s.fill(torch.arange(n), 0, _images, teacher, budget=n, batch_size=batch)
        stored = first_bad_batch * batch
        assert s.count(0) == stored  # every batch before the bad one, nothing from it or after
        assert s.missing(torch.arange(n), 0).tolist() == list(range(stored, n))
        assert s.paid_calls() == sum(len(c) for c in calls)  # the refused batch was paid and is recorded
        assert "refused" in s.ledger()[-1][3]
        if stored:
            assert torch.equal(
                s.logits(torch.arange(stored), 0), _teacher_out(_images(torch.arange(stored)))["logits"]
            )
