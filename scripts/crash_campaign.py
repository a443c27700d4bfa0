"""Crash campaigns: SIGKILL ftikd at random moments, restart it, and check what the crashes cost.

``caching`` fills a TeacherStore for n samples in a child process whose deterministic teacher logs
every invocation (sample ids, appended, flushed and fsynced before the teacher computes anything,
so the log is the record of paid calls). The child is killed at a random moment (during start-up
and store creation, or a random time after its k-th teacher call: inside a call, between the call
and the commit, or between batches), restarted, killed again, ... until the store is complete; a
campaign is a sequence of such rounds on fresh stores until ``--kills`` kills were sent. Then:

* calls lost: requested samples with no stored output once a round completed (must be 0);
* calls repeated: invocations of a sample beyond its first, raw and after subtracting re-payment of
  batches that were in flight at a kill (paid but not committed: the documented maximum loss per
  kill). The latter must be 0;
* the store passes SQLite's integrity check, its ledger equals the logged calls minus the in-flight
  ones, and every stored logit equals the teacher's deterministic output.

Usage: ``python scripts/crash_campaign.py --kills 50 --seed 1 --out results/crash_caching.json``.
Campaigns are registered in ``CAMPAIGNS``; ``--campaign`` picks one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FINGERPRINT = "crash-campaign-teacher-v1"
DATASET = "crash-campaign"
CLASSES = 10
CHILD_CACHING = "_child-caching"
MAX_KILLS_PER_ROUND = 8
STARTUP_KILL_P = 0.15  # share of kills aimed at start-up (imports, store open or creation)


def teacher_logits(ids: np.ndarray) -> np.ndarray:
    """The campaign teacher's deterministic output for sample ids, (len(ids), CLASSES) float32."""
    ids = np.asarray(ids, dtype=np.float32)[:, None]
    return (np.sin(ids * 0.37 + np.arange(CLASSES, dtype=np.float32) * 0.11) * 3.0).astype(np.float32)


# ----------------------------------------------------------------------------------- child side


def child_caching(store: str, log: str, attempt: int, n: int, batch: int, sleep_s: float) -> int:
    """Fill ``store`` for samples 0..n-1 with the logging teacher (runs in the killed subprocess)."""
    import torch

    from ftikd.teacher import TeacherStore

    def images_fn(ids: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(ids.numel(), 1, 1, 1)
        x[:, 0, 0, 0] = ids.to(torch.float32)
        return x

    def teacher(x: torch.Tensor) -> torch.Tensor:
        ids = x[:, 0, 0, 0].round().long().tolist()
        # The call is paid the moment it starts: record it durably before doing anything else.
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps({"attempt": attempt, "pid": os.getpid(), "ids": ids}) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        time.sleep(sleep_s)  # a slow remote teacher: widens the window in which a kill is in flight
        return torch.from_numpy(teacher_logits(np.asarray(ids)))

    with TeacherStore.open(store, FINGERPRINT, DATASET, CLASSES) as s:
        s.fill(torch.arange(n), 0, images_fn, teacher, budget=n, batch_size=batch)
    print("complete", flush=True)
    return 0


# ---------------------------------------------------------------------------------- parent side


def _log_lines(log: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of the call log (a line cut by a kill mid-write is ignored)."""
    if not log.exists():
        return []
    out = []
    for line in log.read_bytes().split(b"\n"):
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _stored(store: Path, ids: list[int]) -> set[int]:
    """Which of ``ids`` have a committed output (plain SQLite read; never creates the file)."""
    if not store.exists() or not ids:
        return set()
    con = sqlite3.connect(store)  # a plain reader; may recover the killed writer's WAL, as ftikd would
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "outputs" not in tables:
            return set()
        marks = ",".join("?" * len(ids))
        rows = con.execute(f"SELECT sample FROM outputs WHERE view=0 AND sample IN ({marks})", ids)
        return {int(r[0]) for r in rows}
    finally:
        con.close()


def _spawn(script: Path, store: Path, log: Path, attempt: int, n: int, batch: int, sleep_s: float):
    args = [str(store), str(log), str(attempt), str(n), str(batch), str(sleep_s)]
    return subprocess.Popen(
        [sys.executable, str(script), CHILD_CACHING, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_at_random_moment(
    proc: subprocess.Popen, log: Path, attempt: int, rng: np.random.Generator, sleep_s: float
) -> bool:
    """SIGKILL ``proc`` at a random moment; False when it finished before the moment came."""
    if rng.random() < STARTUP_KILL_P:
        deadline = time.monotonic() + rng.uniform(0.0, 2.0)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            time.sleep(0.005)
    else:
        calls = int(rng.integers(1, 5))  # after this attempt's k-th teacher call ...
        while sum(1 for c in _log_lines(log) if c["attempt"] == attempt) < calls:
            if proc.poll() is not None:
                return False
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 1.5 * sleep_s))  # ... plus a random part of one call's time
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def _verify_round(store: Path, log: Path, n: int, in_flight: list[list[int]]) -> dict[str, Any]:
    """Compare the completed store with the call log."""
    import torch

    from ftikd.teacher import TeacherStore

    calls = _log_lines(log)
    counts = Counter(s for c in calls for s in c["ids"])
    flight = Counter(s for ids in in_flight for s in ids)
    with TeacherStore.open(store, FINGERPRINT, DATASET, CLASSES) as s:
        missing = set(s.missing(torch.arange(n), 0).tolist())
        have = [i for i in range(n) if i not in missing]
        stored = s.logits(torch.tensor(have, dtype=torch.int64), 0).numpy()
        mismatched = int((stored != teacher_logits(np.asarray(have))).any(axis=1).sum())
        ledger = s.paid_calls()
    con = sqlite3.connect(store)
    try:
        integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
        per_sample = con.execute(
            "SELECT COUNT(*) FROM outputs GROUP BY sample HAVING COUNT(*) > 1"
        ).fetchall()
    finally:
        con.close()
    invocations = sum(counts.values())
    return {
        "calls_lost": len(missing),
        "calls_repeated_raw": sum(c - 1 for c in counts.values() if c > 1),
        # a sample may be paid once more for every in-flight batch it was part of, never otherwise
        "calls_repeated": sum(max(0, counts[s] - 1 - flight[s]) for s in counts),
        "in_flight_batches": len(in_flight),
        "in_flight_batches_repaid": _repaid(in_flight, counts),
        "in_flight_samples": sum(flight.values()),
        "never_invoked": sum(1 for s in range(n) if counts[s] == 0),
        "ledger_mismatch": int(ledger != invocations - sum(flight.values())),
        "logits_mismatched": mismatched,
        "integrity_ok": integrity == "ok",
        "duplicate_rows": len(per_sample),
        "invocations": invocations,
    }


def _repaid(in_flight: list[list[int]], counts: Counter[int]) -> int:
    """In-flight batches whose every sample was invoked again after that kill."""
    seen: Counter[int] = Counter()
    repaid = 0
    for ids in in_flight:
        seen.update(ids)
        repaid += all(counts[s] > seen[s] for s in ids)
    return repaid


def campaign_caching(
    kills: int,
    seed: int,
    workdir: Path,
    n: int = 200,
    batch: int = 8,
    sleep_s: float = 0.02,
) -> dict[str, Any]:
    """Kill teacher-output caching ``kills`` times at random moments; return the campaign's figures.

    Rounds of at most MAX_KILLS_PER_ROUND kills each run on a fresh store; a round ends with an
    unkilled run that completes the store, which is then verified against the call log.
    """
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve()
    totals: Counter[str] = Counter()
    failures: list[str] = []
    kills_sent = kills_missed = resumes = resumes_ok = rounds = 0
    integrity_ok = True
    while kills_sent < kills:
        rounds += 1
        store, log = workdir / f"round{rounds}.sqlite", workdir / f"round{rounds}.calls.jsonl"
        planned = min(MAX_KILLS_PER_ROUND, kills - kills_sent)
        in_flight: list[list[int]] = []
        attempt, killed_before, complete = 0, False, False
        while not complete:
            attempt += 1
            proc = _spawn(script, store, log, attempt, n, batch, sleep_s)
            if attempt <= planned and _kill_at_random_moment(proc, log, attempt, rng, sleep_s):
                kills_sent += 1
                if killed_before:
                    resumes += 1
                    resumes_ok += 1  # it ran until we killed it: the resume itself did not fail
                killed_before = True
                mine = [c["ids"] for c in _log_lines(log) if c["attempt"] == attempt]
                committed = _stored(store, mine[-1]) if mine else set()
                if mine and not committed:  # paid, not committed: the batch in flight
                    in_flight.append(mine[-1])
                elif mine and committed != set(mine[-1]):
                    failures.append(f"round {rounds} attempt {attempt}: batch partially committed")
                continue
            out, err = proc.communicate(timeout=300)
            if attempt <= planned:
                kills_missed += 1  # it completed before the chosen moment
            if killed_before:
                resumes += 1
                resumes_ok += int(proc.returncode == 0)
            if proc.returncode != 0:
                tail = (err or out).strip().splitlines()[-1:] or ["no output"]
                failures.append(f"round {rounds} attempt {attempt}: rc {proc.returncode}: {tail[0]}")
                break
            complete = True
        if not complete:
            break
        figures = _verify_round(store, log, n, in_flight)
        integrity_ok &= bool(figures.pop("integrity_ok"))
        totals.update(figures)
    return {
        "campaign": "caching",
        "seed": seed,
        "n": n,
        "batch": batch,
        "kills_requested": kills,
        "kills_tried": kills_sent,
        "kills_missed": kills_missed,
        "rounds": rounds,
        "resumes": resumes,
        "resumes_succeeded": resumes_ok,
        "calls_lost": totals["calls_lost"],
        "calls_repeated": totals["calls_repeated"],
        "calls_repeated_raw": totals["calls_repeated_raw"],
        "in_flight_batches": totals["in_flight_batches"],
        "in_flight_batches_repaid": totals["in_flight_batches_repaid"],
        "in_flight_samples": totals["in_flight_samples"],
        "never_invoked": totals["never_invoked"],
        "ledger_mismatches": totals["ledger_mismatch"],
        "logits_mismatched": totals["logits_mismatched"],
        "duplicate_rows": totals["duplicate_rows"],
        "integrity_ok": integrity_ok,
        "teacher_invocations": totals["invocations"],
        "failures": failures,
        "wall_s": round(time.perf_counter() - started, 2),
    }


# ----------------------------------------------------------------------------------- training

TRAIN_ARGS = ["--dataset", "digits", "--method", "kd", "--calls", "120", "--patience", "3", "--phases", "2",
              "--max-epochs", "10", "--no-progress", "--resume"]  # fmt: skip


def _campaign_teacher(path: Path) -> Path:
    """An untrained, seeded digits teacher: deterministic outputs are all the campaign needs."""
    import torch

    from ftikd.models import build_model
    from ftikd.teacher import save_checkpoint

    torch.manual_seed(0)
    model = build_model("resnet8", in_channels=1, num_classes=10)
    save_checkpoint(
        model, path, {"arch": "resnet8", "in_channels": 1, "num_classes": 10, "dataset": "digits"}
    )
    return path


def _strip_times(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "time_s"} for h in record["history"]]


def campaign_training(
    kills: int, seed: int, workdir: Path, runs: int = 2, max_kills_per_run: int = 6
) -> dict[str, Any]:
    """Kill ``ftikd distill --resume`` at random moments (start-up, caching, training, record writing).

    Runs (seeds 1, 2, ..., KD on digits) are restarted with the same command until they exit 0; each
    takes up to ``max_kills_per_run`` kills, and further runs are started until ``kills`` kills were
    sent and at least ``runs`` runs finished. Then: every run has exactly one record, equal
    (metrics and per-epoch history) to an uninterrupted in-process reference; no checkpoint or
    pending file is left; the store opens, holds every sample once, and its ledger of paid calls
    equals the number of distinct samples (no paid call lost or paid twice).
    """
    import torch

    from ftikd.experiments.run import RunPaths, run_distillation
    from ftikd.teacher import TeacherStore

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    teacher = _campaign_teacher(workdir / "teacher.safetensors")
    out = workdir / "killed" / "runs"
    failures: list[str] = []
    # bit equality with the in-process reference needs the same computation: the same thread count
    same_threads = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    kills_sent = kills_missed = resumes = resumes_ok = 0
    results = []
    run = -1
    while (kills_sent < kills and run + 1 < runs + kills) or run + 1 < runs:
        run += 1
        planned = min(max_kills_per_run, kills - kills_sent)
        args = [*TRAIN_ARGS, "--seed", str(run + 1), "--teacher", str(teacher)]
        ref_started = time.perf_counter()
        ref_cfg = _cli_config(args, workdir / "reference" / "runs")
        reference = run_distillation(ref_cfg, progress=False).record
        ref_s = time.perf_counter() - ref_started
        cfg = _cli_config(args, out)
        attempt, killed_before = 0, False
        while True:
            attempt += 1
            proc = subprocess.Popen(
                [sys.executable, "-m", "ftikd.cli", "distill", *args, "--out", str(out)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=same_threads,
            )
            if attempt <= planned:
                time.sleep(rng.uniform(0.2, 3.0 + ref_s))  # start-up (imports) takes about 3 s
                if proc.poll() is not None:
                    kills_missed += 1  # it finished before the chosen moment
                else:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    kills_sent += 1
                    resumes += int(killed_before)
                    resumes_ok += int(killed_before)
                    killed_before = True
                    continue
            _, err = proc.communicate(timeout=600)
            resumes += int(killed_before)
            resumes_ok += int(killed_before and proc.returncode == 0)
            if proc.returncode != 0:
                failures.append(
                    f"run {run + 1}: rc {proc.returncode}: {(err.strip().splitlines() or [''])[-1]}"
                )
            break
        paths = RunPaths.of(cfg)
        if paths.record.exists():
            record = json.loads(paths.record.read_text())
            same = record["metrics"] == reference["metrics"] and _strip_times(record) == _strip_times(
                reference
            )
            results.append(same)
            if not same:
                failures.append(f"run {run + 1}: resumed numbers differ from the uninterrupted run")
        else:
            failures.append(f"run {run + 1}: no record after completion")
        if paths.state.exists() or paths.pending.exists():
            failures.append(f"run {run + 1}: checkpoint or pending file left behind")
    records = sorted(p.name for p in out.glob("*.json") if not p.name.endswith(".pending.json"))
    stores = sorted((out.parent / "stores").glob("*.sqlite"))
    stored = paid = 0
    for store in stores:
        with TeacherStore.open(store, store.stem.split("-", 1)[1], "digits", 10) as s:
            stored += s.count()
            paid += s.paid_calls()
    distinct = _distinct_samples(run + 1)
    return {
        "campaign": "training",
        "seed": seed,
        "runs": run + 1,
        "kills_missed": kills_missed,
        "kills_requested": kills,
        "kills_tried": kills_sent,
        "resumes": resumes,
        "resumes_succeeded": resumes_ok,
        "runs_finished": len(records),
        "runs_equal_to_uninterrupted": sum(results),
        "calls_lost": distinct - stored,
        "calls_repeated": paid - stored,
        "store_paid_calls": paid,
        "distinct_samples": distinct,
        "failures": failures,
        "wall_s": round(time.perf_counter() - started, 2),
    }


def _cli_config(args: list[str], out: Path):
    """The RunConfig that ``ftikd distill ARGS --out OUT`` builds."""
    from ftikd.cli import build_parser, distill_config

    return distill_config(build_parser().parse_args(["distill", *args, "--out", str(out)]))


def _distinct_samples(runs: int) -> int:
    """Distinct training samples over the campaign's runs: the calls a perfect store pays."""
    import torch

    from ftikd.data import fti_split, load_dataset

    total = load_dataset("digits").train_images.shape[0]
    ids = [fti_split(total, 120, run + 1).train_idx for run in range(runs)]
    return int(torch.unique(torch.cat(ids)).numel())


# name -> campaign(kills, seed, workdir) -> summary dict
CAMPAIGNS: dict[str, Callable[[int, int, Path], dict[str, Any]]] = {
    "caching": campaign_caching,
    "training": campaign_training,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == CHILD_CACHING:
        store, log, attempt, n, batch, sleep_s = argv[1:7]
        return child_caching(store, log, int(attempt), int(n), int(batch), float(sleep_s))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--campaign", choices=sorted(CAMPAIGNS), default="caching")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to send in total")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where stores and logs go (default: a temporary folder)")
    parser.add_argument("--out", help="write the summary JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ftikd-crash-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        summary = CAMPAIGNS[args.campaign](args.kills, args.seed, workdir)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    ok = summary.get("calls_lost") == 0 and summary.get("calls_repeated") == 0 and not summary.get("failures")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
