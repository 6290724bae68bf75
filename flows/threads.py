"""How the flows run the kernel's threads: one BLAS thread under each, a short GIL interval."""

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import threadpool_limits

# The kernel's threads hand the GIL back and forth between ~15 short NumPy calls
# per block. At CPython's default 5 ms interval a thread waiting for the GIL can
# stall for the whole interval; at 10 µs, 1M x 100 float64 on 2 cores went from
# 60.7 ms to 49.5 ms per iteration (benchmarks/RESULTS.md).
KERNEL_SWITCH_INTERVAL_S = 1e-5


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
