"""Shared pieces of the fuzz tests over every reader of user files (tests/test_fuzz_*.py).

Each reader gets malformed inputs (random bytes, truncations, bit flips, wrong structures, hostile
headers) and must either return well-formed data or raise :class:`FtikdError` with a one-line
message: never another exception type, never a hang (SIGALRM), never a large allocation (tracemalloc
sees Python and numpy allocations). ``attempt`` enforces that; each fuzz module prints how many
inputs it tried per reader (``[fuzz] malformed inputs tried``; the fixtures ``fuzz_base`` and the
count report live in conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from ftikd.errors import FtikdError

T = TypeVar("T")

TRIED: Counter[str] = Counter()
MEM_LIMIT = 64 << 20  # peak Python + numpy allocation allowed while reading one small malformed file
HANG_S = 20.0


# FTIKD_FUZZ_SCALE=20 multiplies every example count, for a long bug hunt outside the default run.
SCALE = float(os.environ.get("FTIKD_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    """Hypothesis settings for one reader: ``examples`` inputs, no per-example deadline."""
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class Hang(Exception):
    """A reader ran for longer than HANG_S on a tiny input."""


def _alarm(signum: int, frame: Any) -> None:
    raise Hang(f"reader still running after {HANG_S}s")


def attempt(reader: str, fn: Callable[[], T], one_line: bool = True) -> T | None:
    """One reader call on a (possibly) malformed input: its result, or None if it raised FtikdError.

    Any other exception propagates and fails the test; so does a run over HANG_S seconds or a peak
    traced allocation over MEM_LIMIT. FtikdError messages must be one line (unless ``one_line`` is
    False).
    """
    TRIED[reader] += 1
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    tracemalloc.start()
    try:
        return fn()
    except FtikdError as e:
        assert not one_line or "\n" not in str(e), f"multi-line FtikdError: {e!r}"
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        assert peak < MEM_LIMIT, f"{reader} allocated {peak / 2**20:.0f} MiB on a tiny input"


@contextlib.contextmanager
def scratch(base: Path) -> Iterator[Path]:
    """A fresh directory per hypothesis example (function-scoped tmp_path is shared by examples)."""
    d = Path(tempfile.mkdtemp(dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------ generic byte mutations

HUGE_U32 = st.sampled_from([0, 1, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1])


@st.composite
def mutated(draw: st.DrawFn, data: bytes, header: int = 16) -> bytes:
    """``data`` after 1-4 random edits: truncation, bit flip, byte overwrite, insertion, junk tail.

    Offsets favour the first ``header`` bytes, where formats keep their magic numbers and sizes.
    """
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "set", "insert", "append", "delete"]))
        if not buf:
            op = "append"
        limit = min(len(buf), header) if draw(st.booleans()) else len(buf)
        at = draw(st.integers(0, max(limit - 1, 0)))
        if op == "truncate":
            del buf[at:]
        elif op == "flip":
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            buf[at] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[at : at + draw(st.integers(1, 8))]
        else:
            buf += draw(st.binary(min_size=1, max_size=16))
    return bytes(buf)


class Blob(bytes):
    """Fixture bytes that hypothesis prints as their length, not their content."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6)
)
