"""Resume a killed run: SIGKILL a real `ftikd distill` process mid-training, resume, same numbers."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from ftikd.cli import main
from ftikd.experiments.run import RunConfig, RunPaths, run_distillation

ARGS = ["--dataset", "digits", "--method", "ckd", "--opt", "k=3", "--calls", "160", "--seed", "4",
        "--patience", "6", "--phases", "2", "--max-epochs", "40", "--no-progress"]  # fmt: skip


def strip_times(record):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in record["history"]]


def test_sigkill_mid_training_then_resume_matches_uninterrupted(tmp_path, digits_teacher, capsys):
    assert (
        main(["distill", *ARGS, "--teacher", str(digits_teacher), "--out", str(tmp_path / "a" / "runs")]) == 0
    )
    reference = json.loads(next((tmp_path / "a" / "runs").glob("*.json")).read_text())

    out = tmp_path / "b" / "runs"
    cmd = [
        sys.executable,
        "-m",
        "ftikd.cli",
        "distill",
        *ARGS,
        "--teacher",
        str(digits_teacher),
        "--out",
        str(out),
    ]
    # the killed attempt must compute exactly as this process does: same torch thread count
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    cfg = RunConfig.from_file(tmp_path / "a" / "runs" / f"{reference['run']}.json")
    cfg.out = str(out)
    paths = RunPaths.of(cfg)
    deadline = time.time() + 120
    while not paths.state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.1)  # land somewhere inside a later pseudo-epoch
    assert proc.poll() is None, "the run finished before it could be killed; lengthen it"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert paths.pending.exists() and not paths.record.exists()

    assert main(["resume", str(out), "--no-progress"]) == 0
    resumed = json.loads(paths.record.read_text())
    assert resumed["metrics"] == reference["metrics"]
    assert strip_times(resumed) == strip_times(reference)
    # wall time counts the killed attempt's checkpointed training too, so it covers all training
    assert resumed["wall_time_s"] >= resumed["train_time_s"] >= resumed["history"][-1]["time_s"]
    assert not paths.state.exists() and not paths.pending.exists()
    # resuming a finished run returns its record without training again
    again = run_distillation(cfg, progress=False, resume=True)
    assert again.record == resumed
