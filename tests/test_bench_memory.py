"""Peak step memory for ``ftikd bench``: the running maximum of allocations, and real steps."""

import torch

from ftikd.experiments.bench_memory import peak_of, step_peak_mib


def test_peak_is_the_running_maximum_in_time_order():
    # given out of order: at t=1 +10, t=2 +5 (15 held), t=3 -10, t=4 +7 (12 held)
    assert peak_of([(4, 7), (1, 10), (3, -10), (2, 5)]) == 15
    assert peak_of([]) == 0


def test_a_step_that_holds_8_mib_at_once_peaks_near_8_mib():
    def step() -> None:
        a = torch.ones(1024, 1024, dtype=torch.float32)  # 4 MiB
        b = torch.ones(1024, 1024, dtype=torch.float32)  # 4 MiB more while a is alive
        del a, b
        c = torch.ones(512, 1024, dtype=torch.float32)  # 2 MiB after both were freed
        del c

    peak = step_peak_mib(step, torch.device("cpu"))
    assert 7.99 <= peak < 8.5, peak


def test_a_step_that_allocates_nothing_peaks_near_zero():
    x = torch.ones(10)
    assert step_peak_mib(lambda: x.add_(1), torch.device("cpu")) < 0.01
