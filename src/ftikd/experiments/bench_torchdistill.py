"""The torchdistill side of ``ftikd bench``: its KD step timed in another environment, round by round.

torchdistill needs torchvision, which does not import beside ftikd's pinned CPU torch, so
``benchmarks/torchdistill_kd.py`` runs under another python (``--torchdistill-python``) as a worker
that times one round per request; ftikd's rounds and its rounds alternate (docs/bench/README.md).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

import torch

from ftikd.errors import FtikdError

if TYPE_CHECKING:
    from ftikd.experiments.bench import BenchConfig


TORCHDISTILL_SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "torchdistill_kd.py"
TORCHDISTILL_VENV = (
    "create one with: python3 -m venv /tmp/tdv && /tmp/tdv/bin/pip install torch==2.14.1 "
    "torchvision==0.29.1 torchdistill==1.1.5, then pass --torchdistill-python /tmp/tdv/bin/python"
)
TORCHDISTILL_MODES = {
    "torchdistill-kd-teacher": "teacher forward every step",
    "torchdistill-kd-cached": "cached teacher logits",
}


class TorchdistillWorker:
    """``benchmarks/torchdistill_kd.py --serve`` under another python, timing one round per request.

    Rounds on both sides of the pipe alternate (only one side computes at a time), so that ftikd and
    torchdistill are timed seconds apart under the same machine load. Use it as a context manager.
    """

    def __init__(self, cfg: BenchConfig) -> None:
        self.python = str(cfg.torchdistill_python)
        if not TORCHDISTILL_SCRIPT.is_file():
            raise FtikdError(
                f"--torchdistill-python needs a source checkout ({TORCHDISTILL_SCRIPT} is missing)"
            )
        self.log: IO[str] = tempfile.TemporaryFile(mode="w+")
        try:
            self.proc = subprocess.Popen(
                torchdistill_command(cfg),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log,
                text=True,
            )
        except OSError as exc:
            self.log.close()
            raise FtikdError(f"cannot run {self.python} ({exc.strerror}); {TORCHDISTILL_VENV}") from None
        hello = self.receive()
        self.what: dict[str, str] = hello["what"]
        self.versions: dict[str, str] = hello["versions"]

    def __enter__(self) -> TorchdistillWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def receive(self) -> dict[str, Any]:
        """The next JSON line from the script; its death or garbage is a user error."""
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            self.fail()

    def fail(self) -> NoReturn:
        """Stop the script and raise one line naming the fix."""
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait()
        if code == 3:
            raise FtikdError(
                f"torch, torchvision or torchdistill is missing for {self.python}; {TORCHDISTILL_VENV}"
            )
        self.log.seek(0)
        detail = (self.log.read().strip().splitlines() or [f"exit status {code}"])[-1]
        raise FtikdError(
            f"the torchdistill benchmark failed under {self.python}: {detail}; {TORCHDISTILL_VENV}"
        )

    def round(self, arch: str) -> dict[str, float]:
        """Wall times of the script's bare step and KD modes for ``arch``, one run each."""
        try:
            self.proc.stdin.write(arch + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.fail()
        return self.receive()

    def close(self) -> dict[str, Any]:
        """End the script; its peak RSS and versions."""
        self.proc.stdin.close()
        info = self.receive()
        self.proc.wait()
        return {"versions": self.versions, **info}


def torchdistill_command(cfg: BenchConfig) -> list[str]:
    """The command serving ``benchmarks/torchdistill_kd.py`` rounds with this bench's settings and threads."""
    settings = {
        "teacher": cfg.teacher,
        "channels": cfg.channels,
        "image-size": cfg.image_size,
        "num-classes": cfg.num_classes,
        "num-train": cfg.num_train,
        "batch-size": cfg.batch_size,
        "steps": cfg.steps,
        "threads": torch.get_num_threads(),
        "device": cfg.device,
    }
    flags = [arg for name, value in settings.items() for arg in (f"--{name}", str(value))]
    script = str(TORCHDISTILL_SCRIPT)
    return [str(cfg.torchdistill_python), script, "--serve", "--students", *cfg.students, *flags]
