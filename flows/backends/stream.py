"""Out of core on one machine: a column-stacked on-disk cache streamed through the fused kernel.

The cache is one ``.npy`` file of shape ``(n_features + 1, n_examples)`` in the
training dtype: rows ``0..n-1`` are the standardized ``X``, row ``n`` is ``Y``,
each row contiguous on disk as in memory. It is built in one pass over the
Parquet input (after a first pass that validates and takes the moments),
written under a temporary name and renamed, and reused while the input's
fingerprint and the config that shaped it are unchanged.

Memory is bounded by explicit reads (``os.preadv``) into two reused buffers,
never a memory map: pages of a map that were touched count towards the
process's resident memory, so a map of the cache would grow to the file's size.
"""

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flows import durable
from flows.backends.pieces import (
    ValueSummary,
    finish_summary,
    iter_batches,
    kernel_arrays,
    merge_metrics,
    piece_sums,
    summarize,
)
from flows.dataset import InputPlan, LabelMapping, fingerprint
from lr_kernel import FusedLoss, loss_from_sums

CACHE_FORMAT = 1
# Shares of the memory budget: the two read buffers of training, and one
# Parquet batch during conversion (the batch exists ~4 times over: Arrow,
# float64 features, deviations or the dtype copy). The rest is headroom for the
# allocator and the libraries' own working memory.
BUFFERS_SHARE = 4
BATCH_SHARE = 16


@dataclass(frozen=True)
class StreamData:
    """A training set held in a stream cache: what the flow needs besides ``X`` and ``Y``.

    The same attributes as :class:`flows.dataset.Dataset` minus the matrices,
    plus the cache's location; :meth:`loss` streams the matrices.
    """

    features: tuple[str, ...]
    label: str
    label_mapping: LabelMapping
    mean: np.ndarray
    scale: np.ndarray
    standardized: bool
    files: tuple[Path, ...]
    fingerprint: str
    n_examples: int
    dtype: np.dtype
    path: Path
    memory_budget: int
    cleanup: bool = False
    validation: None = None  # held-out data needs the memory backend

    def loss(self, n_threads: int = 1) -> "StreamLoss":
        return StreamLoss(
            self.path / "XY.npy",
            n_features=len(self.features),
            n_examples=self.n_examples,
            dtype=self.dtype,
            chunk_examples=chunk_examples(len(self.features), self.dtype, self.memory_budget),
            n_threads=n_threads,
        )

    def train_metrics(self, w: np.ndarray, b: float) -> dict[str, float]:
        """:func:`lr_kernel.metrics.binary_metrics` over the whole cache, chunk by chunk."""
        with self.loss() as source:
            parts = [piece_sums(w.T @ X + b, Y) for X, Y in source.chunks()]
        return merge_metrics(parts)

    def close(self) -> None:
        """Delete the cache when the run asked for it (``--cleanup-cache``)."""
        if self.cleanup:
            shutil.rmtree(self.path, ignore_errors=True)


def chunk_examples(n_features: int, dtype: np.dtype, memory_budget: int) -> int:
    """Examples per streamed chunk: two buffers of ``(n + 1, chunk)`` in a quarter of the budget."""
    per_example = 2 * (n_features + 1) * np.dtype(dtype).itemsize
    return max(1024, memory_budget // BUFFERS_SHARE // per_example)


def open_stream(
    plan: InputPlan,
    *,
    cache_root: Path,
    memory_budget: int,
    standardize: bool = True,
    dtype: str = "float64",
    positive_label: str | None = None,
    cleanup: bool = False,
) -> StreamData:
    """The stream cache for this input and config: reused when present, else built."""
    digest = fingerprint(plan.files)
    key = _cache_key(plan, digest, standardize, dtype, positive_label)
    path = cache_root / key
    if not (path / "meta.json").is_file():
        _build_cache(plan, path, memory_budget, standardize, dtype, positive_label, digest)
    meta = json.loads((path / "meta.json").read_text())
    mapping = LabelMapping(**meta["label_mapping"])
    return StreamData(
        features=plan.features,
        label=plan.label,
        label_mapping=mapping,
        mean=np.array(meta["mean"], dtype=np.float64),
        scale=np.array(meta["scale"], dtype=np.float64),
        standardized=standardize,
        files=plan.files,
        fingerprint=digest,
        n_examples=meta["n_examples"],
        dtype=np.dtype(dtype),
        path=path,
        memory_budget=memory_budget,
        cleanup=cleanup,
    )


def _cache_key(
    plan: InputPlan, digest: str, standardize: bool, dtype: str, positive_label: str | None
) -> str:
    shape = [CACHE_FORMAT, digest, plan.features, plan.label, standardize, dtype, positive_label]
    return hashlib.blake2b(json.dumps(shape).encode(), digest_size=16).hexdigest()


def _build_cache(
    plan: InputPlan,
    path: Path,
    memory_budget: int,
    standardize: bool,
    dtype: str,
    positive_label: str | None,
    digest: str,
) -> None:
    """Two passes over the Parquet input: checks and moments, then the cache rows."""
    n = len(plan.features)
    batch_rows = max(1024, memory_budget // BATCH_SHARE // ((n + 1) * 8))
    summary = ValueSummary.empty(n)
    for file in plan.files:
        for frame in iter_batches(plan, file, batch_rows):
            summary.merge(summarize(frame, plan, file))
    mapping, mean, scale = finish_summary(plan, summary, positive_label, standardize)
    m = summary.rows
    target = np.dtype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built in a hidden sibling, then renamed whole: a reader sees all of it or none.
    building = durable.temporary_name(path)
    building.mkdir()
    try:
        with (building / "XY.npy").open("wb") as handle:
            header = {
                "descr": np.lib.format.dtype_to_descr(target),
                "fortran_order": False,
                "shape": (n + 1, m),
            }
            np.lib.format.write_array_header_1_0(handle, header)
            offset = handle.tell()
            handle.truncate(offset + (n + 1) * m * target.itemsize)
            fd = handle.fileno()
            start = 0
            for file in plan.files:
                for frame in iter_batches(plan, file, batch_rows):
                    X, Y = kernel_arrays(frame, plan, mapping, mean, scale, target)
                    for j, row in enumerate([*X, Y[0]]):  # row j of (n + 1, m) at [start, start+k)
                        _write_all(fd, row, offset + (j * m + start) * target.itemsize)
                    start += frame.height
            handle.flush()
            os.fsync(fd)
        meta = {
            "format": CACHE_FORMAT,
            "input_fingerprint": digest,
            "input_files": [str(p) for p in plan.files],
            "features": list(plan.features),
            "label": plan.label,
            "label_mapping": mapping.to_json(),
            "standardized": standardize,
            "dtype": dtype,
            "n_examples": m,
            "mean": mean.tolist(),
            "scale": scale.tolist(),
        }
        durable.write_bytes(building / "meta.json", json.dumps(meta).encode())
        try:
            durable.rename(building, path)
        except OSError:
            if not (path / "meta.json").is_file():  # not a concurrent run's identical cache
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _write_all(fd: int, row: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(row)).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class StreamLoss:
    """A :class:`lr_kernel.LossFunction` over a stream cache, read in chunks each call.

    Each chunk of ``chunk_examples`` columns is read into one of two reused
    buffers of shape ``(n_features + 1, chunk_examples)`` while the other is
    summed by a :class:`lr_kernel.FusedLoss` (reads release the GIL, so disk
    or page cache and arithmetic overlap). Chunk sums are added in chunk order
    and finished by :func:`lr_kernel.loss_from_sums`, as the in-memory loss is.
    """

    def __init__(
        self,
        path: Path,
        *,
        n_features: int,
        n_examples: int,
        dtype: np.dtype,
        chunk_examples: int,
        n_threads: int = 1,
    ) -> None:
        self._n = n_features
        self._m = n_examples
        self._dtype = np.dtype(dtype)
        self._n_threads = n_threads
        chunk = min(chunk_examples, n_examples)
        self._ranges = [(s, min(s + chunk, n_examples)) for s in range(0, n_examples, chunk)]
        self._fd = os.open(path, os.O_RDONLY)
        with open(path, "rb") as handle:
            np.lib.format.read_magic(handle)
            shape, _, descr = np.lib.format.read_array_header_1_0(handle)
            self._offset = handle.tell()
        expected = (n_features + 1, n_examples)
        if shape != expected or descr != self._dtype:
            raise ValueError(f"{path}: cache holds {shape} {descr}, not {expected} {self._dtype}")
        self._buffers = [np.empty((n_features + 1, chunk), self._dtype) for _ in range(2)]
        self._losses: dict[tuple[int, int], FusedLoss] = {}
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrflow-read")

    @property
    def n_features(self) -> int:
        return self._n

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(X, Y)`` views of shapes ``(n, k)`` and ``(1, k)`` for each chunk, in order.

        A view is overwritten once the next one is requested.
        """
        for index, k in self._buffer_order():
            buffer = self._buffers[index]
            yield buffer[: self._n, :k], buffer[self._n :, :k]

    def partial_sums(self, w: np.ndarray, b: float) -> tuple[float, np.ndarray, float]:
        losses, dbs = [], []
        dw_sum = np.zeros(self._n)
        for index, k in self._buffer_order():
            loss_sum, dw_part, db_sum = self._loss(index, k).partial_sums(w, b)
            losses.append(loss_sum)
            dw_sum += dw_part
            dbs.append(db_sum)
        return math.fsum(losses), dw_sum, math.fsum(dbs)

    def __call__(self, w: np.ndarray, b: float, l2: float = 0.0) -> tuple[float, np.ndarray, float]:
        loss_sum, dw_sum, db_sum = self.partial_sums(w, b)
        return loss_from_sums(loss_sum, dw_sum, db_sum, w, l2, self._m, self._dtype)

    def close(self) -> None:
        self._reader.shutdown(wait=True)
        os.close(self._fd)

    def __enter__(self) -> "StreamLoss":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _buffer_order(self) -> Iterator[tuple[int, int]]:
        """Buffer index and width of each chunk once read; the next read runs meanwhile."""
        pending = self._reader.submit(self._read, 0, *self._ranges[0])
        for i, (start, stop) in enumerate(self._ranges):
            pending.result()
            if i + 1 < len(self._ranges):
                pending = self._reader.submit(self._read, (i + 1) % 2, *self._ranges[i + 1])
            try:
                yield i % 2, stop - start
            except GeneratorExit:
                pending.result()  # never leave a read running into a buffer
                raise

    def _read(self, index: int, start: int, stop: int) -> None:
        buffer, itemsize = self._buffers[index], self._dtype.itemsize
        for j in range(self._n + 1):
            view = memoryview(buffer[j, : stop - start]).cast("B")
            offset = self._offset + (j * self._m + start) * itemsize
            while view:
                got = os.preadv(self._fd, [view], offset)
                if got == 0:
                    raise OSError(f"stream cache ended early at byte {offset}")
                view, offset = view[got:], offset + got

    def _loss(self, index: int, k: int) -> FusedLoss:
        key = (index, k)
        if key not in self._losses:
            buffer = self._buffers[index]
            self._losses[key] = FusedLoss(
                buffer[: self._n, :k], buffer[self._n :, :k], n_threads=self._n_threads
            )
        return self._losses[key]
