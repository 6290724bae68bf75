"""How the flows run the kernel's threads: one BLAS thread under each, a short GIL interval."""

import importlib
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import threadpool_limits

# The kernel's threads hand the GIL back and forth between ~15 short NumPy calls
# per block. At CPython's default 5 ms interval a thread waiting for the GIL can
# stall for the whole interval; at 10 µs, 1M x 100 float64 on 2 cores went from
# 60.7 ms to 49.5 ms per iteration (benchmarks/RESULTS.md).
KERNEL_SWITCH_INTERVAL_S = 1e-5


def import_in_background(*modules: str) -> None:
    """Import ``modules``, in this order, on a daemon thread.

    A run waits on the Prefect API for much of its first seconds; modules that
    take a fraction of a second to import (SciPy's linear algebra, matplotlib)
    are imported meanwhile instead of when a task first needs them. That task
    finds them imported, or waits on Python's import lock for the rest.
    """

    def run() -> None:
        for module in modules:
            importlib.import_module(module)

    threading.Thread(target=run, name="import-in-background", daemon=True).start()


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def kernel_threads(n_threads: int = 2) -> Iterator[None]:
    """The setting under which the flows call the kernel with ``n_threads`` threads.

    BLAS is limited to one thread: a multi-threaded BLAS under the kernel's own
    threads oversubscribes the cores, and on a busy machine each of its ~250
    small calls per iteration then waits for a descheduled thread (up to 10x
    slower). With more than one kernel thread the GIL switch interval is
    shortened for the duration, then restored.
    """
    previous = sys.getswitchinterval()
    if n_threads > 1:
        sys.setswitchinterval(KERNEL_SWITCH_INTERVAL_S)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        sys.setswitchinterval(previous)
