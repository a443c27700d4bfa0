"""Time loading N stored logit vectors back into one tensor (issue: under 1 s for 50,000).

Usage: python benchmarks/store_load.py [--n 50000] [--classes 100]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ftikd.teacher import TeacherOutput, TeacherStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite"
        samples = torch.arange(args.n)
        with TeacherStore.open(path, "bench-teacher", "bench", args.classes) as store:
            started = time.perf_counter()
            store.fill(
                samples,
                0,
                lambda idx: idx.float()[:, None],
                lambda x: TeacherOutput(x.repeat(1, args.classes)),
                budget=args.n,
                batch_size=1024,
            )
            fill_s = time.perf_counter() - started
        times = []
        order = samples[torch.randperm(args.n)]
        for _ in range(args.repeats):
            started = time.perf_counter()
            with TeacherStore.open(path, "bench-teacher", "bench", args.classes) as store:
                logits = store.logits(order, 0)
            times.append(time.perf_counter() - started)
        assert logits.shape == (args.n, args.classes) and torch.equal(logits[:, 0], order.float())
    times.sort()
    print(f"store fill of {args.n} outputs: {fill_s:.2f} s")
    median = times[len(times) // 2]
    print(f"open + load {args.n} x {args.classes} logits in shuffled order: median {median:.3f} s, ", end="")
    print(f"min {times[0]:.3f} s over {args.repeats} repeats")


if __name__ == "__main__":
    main()
