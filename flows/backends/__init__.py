"""Where training data lives: in memory, streamed from an on-disk cache, or sharded over Dask.

Every backend hands the solvers a :class:`lr_kernel.LossFunction` whose sums
over examples split exactly across blocks and shards, so the parameters do not
depend on where the sums ran (beyond float rounding).
"""

import os
import re
from pathlib import Path

import pyarrow.parquet as pq

from flows.config import TrainConfig
from flows.dataset import InputPlan
from flows.errors import DataError, LrflowError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_bytes(text: str | int) -> int:
    """``"256MB"`` -> 256_000_000, ``"1GiB"`` -> 2**30; a plain number is bytes."""
    if isinstance(text, int):
        return text
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not found or found.group(2).upper() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 256MB, 2GiB, 1000000)")
    return int(float(found.group(1)) * _UNITS[found.group(2).upper()])


def default_memory_budget() -> int:
    """Half of the machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def count_rows(plan: InputPlan) -> int:
    """Rows of every planned file, from the footers alone."""
    try:
        return sum(pq.read_metadata(path).num_rows for path in plan.files)
    except Exception as error:
        raise DataError(f"cannot read the Parquet footer ({error})", path=plan.files[0]) from None


def in_memory_bytes(plan: InputPlan, n_rows: int, dtype: str) -> int:
    """What the in-memory path holds at its peak: the float64 frame read by Polars, and X."""
    n = len(plan.features)
    itemsize = 4 if dtype == "float32" else 8
    return n_rows * ((n + 1) * 8 + n * itemsize)


def resolve_backend(config: TrainConfig, plan: InputPlan) -> str:
    """The backend a run uses: the configured one, or for ``auto`` memory if it fits the budget."""
    if config.backend != "auto":
        return config.backend
    if config.dask_address is not None:
        return "dask"
    budget = config.memory_budget or default_memory_budget()
    needed = in_memory_bytes(plan, count_rows(plan), config.dtype)
    return "memory" if needed <= budget else "stream"


def cache_root(config: TrainConfig) -> Path:
    """Where stream caches go: ``--cache-dir``, else ``$TMPDIR/lrflow-cache``."""
    if config.cache_dir is not None:
        return Path(config.cache_dir)
    import tempfile

    return Path(tempfile.gettempdir()) / "lrflow-cache"


def open_backend(backend: str, plan: InputPlan, config: TrainConfig):
    """The training data of a ``stream`` or ``dask`` run (``memory`` is :func:`load_dataset`)."""
    common = {
        "standardize": config.standardize,
        "dtype": config.dtype,
        "positive_label": config.positive_label,
    }
    if backend == "stream":
        from flows.backends.stream import open_stream

        return open_stream(
            plan,
            cache_root=cache_root(config),
            memory_budget=config.memory_budget or default_memory_budget(),
            cleanup=config.cleanup_cache,
            **common,
        )
    if backend == "dask":
        try:
            from flows.backends.dask_backend import open_dask
        except ImportError:
            raise LrflowError(
                "the dask backend needs dask.distributed: pip install 'lrflow[dask]'"
            ) from None
        return open_dask(plan, address=config.dask_address, n_workers=config.dask_workers, **common)
    raise ValueError(f"no backend {backend!r}")
