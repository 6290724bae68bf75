"""Out of core on one machine: column-stacked on-disk caches streamed through the fused kernel.

Each cache (training rows, and held-out rows if any) is one ``.npy`` file of
shape ``(n_terms + 1, m)``, or ``(n_terms + 2, m)`` with row weights, in the
training dtype: rows ``0..n-1`` are ``X`` as the feature plan makes it, row
``n`` is ``Y``, row ``n + 1`` the weights; each row contiguous on disk as in
memory. They are built by the two passes every backend makes
(:mod:`flows.backends.passes`), written under a temporary name and renamed,
and reused while the input's fingerprint and the config that shaped them are
unchanged.

Memory is bounded by explicit reads (``os.preadv``) into two reused buffers,
never a memory map: pages of a map that were touched count towards the
process's resident memory, so a map of the cache would grow to the file's size.
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flows import durable
from flows.backends import PartialSums, PiecewiseData
from flows.backends.partial_metrics import piece_sums
from flows.backends.passes import learn, piece_blocks, pieces_of, summarize_piece
from flows.dataset import InputPlan, file_pieces, fingerprint
from flows.features import FeaturePlan, PlanSettings
from lr_kernel import FusedLoss

CACHE_FORMAT = 2
# Shares of the memory budget: the two read buffers of training, and one
# Parquet batch during conversion (the batch exists ~4 times over: Arrow,
# float64 features, the split's copies, the block). The rest is headroom for
# the allocator and the libraries' own working memory.
BUFFERS_SHARE = 4
BATCH_SHARE = 16
PARTS = {False: "train", True: "validation"}


@dataclass
class StreamData(PiecewiseData):
    """:class:`flows.backends.TrainingData` held in stream caches; :meth:`loss` streams them."""

    path: Path
    memory_budget: int
    cleanup: bool = False
    backend: str = "stream"

    def _loss(self, part: str, n_threads: int = 1) -> "StreamLoss":
        return StreamLoss(
            self.path / f"{part}.npy",
            n_features=self.plan.n_terms,
            n_examples=self.n_examples if part == "train" else self.n_validation,
            weighted=self.plan.weighted,
            weight_sum=self.weight_sums[part],
            dtype=self.dtype,
            chunk_examples=chunk_examples(self.plan.n_terms, self.dtype, self.memory_budget),
            n_threads=n_threads,
        )

    def loss(self, n_threads: int = 1, engine: str = "auto") -> "StreamLoss":
        return self._loss("train", n_threads)

    def validation_loss(self) -> "StreamLoss | None":
        return self._loss("validation") if self.n_validation else None

    def metric_sums(self, part: str, w: np.ndarray, b: float) -> list[dict[str, Any]]:
        with self._loss(part) as source:
            return [piece_sums(w.T @ X + b, Y, s) for X, Y, s in source.chunks()]

    def close(self) -> None:
        """Delete the cache when the run asked for it (``--cleanup-cache``)."""
        if self.cleanup:
            shutil.rmtree(self.path, ignore_errors=True)


def chunk_examples(n_features: int, dtype: np.dtype, memory_budget: int) -> int:
    """Examples per streamed chunk: two buffers of ``(n + 2, chunk)`` in a quarter of the budget."""
    per_example = 2 * (n_features + 2) * np.dtype(dtype).itemsize
    return max(1024, memory_budget // BUFFERS_SHARE // per_example)


def open_stream(
    plan: InputPlan,
    validation: InputPlan | None,
    prep: PlanSettings,
    *,
    cache_root: Path,
    memory_budget: int,
    cleanup: bool = False,
) -> StreamData:
    """The stream cache for this input and config: reused when present, else built."""
    files = plan.files + (() if validation is None else validation.files)
    digest = fingerprint(files)
    key = hashlib.blake2b(
        json.dumps([CACHE_FORMAT, digest, dataclasses.asdict(prep)], default=str).encode(),
        digest_size=16,
    ).hexdigest()
    path = cache_root / key
    if not (path / "meta.json").is_file():
        _build_cache(plan, validation, prep, path, memory_budget)
    meta = json.loads((path / "meta.json").read_text())
    return StreamData(
        plan=FeaturePlan.from_json(meta["plan"]),
        files=plan.files,
        validation_files=() if validation is None else validation.files,
        fingerprint=digest,
        n_examples=meta["n_examples"]["train"],
        n_validation=meta["n_examples"]["validation"],
        weight_sums=meta["weight_sums"],
        dtype=np.dtype(prep.dtype),
        path=path,
        memory_budget=memory_budget,
        cleanup=cleanup,
    )


def _build_cache(
    plan: InputPlan,
    validation: InputPlan | None,
    prep: PlanSettings,
    path: Path,
    memory_budget: int,
) -> None:
    """The two passes over the Parquet input: summaries and the plan, then the cache rows."""
    batch_rows = prep.batch_rows(memory_budget // BATCH_SHARE)
    pieces = pieces_of(plan, validation, prep.validation_fraction, file_pieces)
    summaries = [summarize_piece(piece, prep, batch_rows) for piece in pieces]
    feature_plan, train, held_out = learn(
        prep, [s[0] for s in summaries], [s[1] for s in summaries]
    )
    sizes = {False: train.rows, True: held_out.rows}
    n = feature_plan.n_terms
    height = n + 1 + feature_plan.weighted
    target = np.dtype(prep.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built in a hidden sibling, then renamed whole: a reader sees all of it or none.
    building = durable.temporary_name(path)
    building.mkdir()
    try:
        handles, offsets = {}, {}
        for part, m in sizes.items():
            handle = (building / f"{PARTS[part]}.npy").open("wb")
            header = {
                "descr": np.lib.format.dtype_to_descr(target),
                "fortran_order": False,
                "shape": (height, m),
            }
            np.lib.format.write_array_header_1_0(handle, header)
            offsets[part] = handle.tell()
            handle.truncate(offsets[part] + height * m * target.itemsize)
            handles[part] = handle
        weight_sums = {False: 0.0, True: 0.0}
        start = {False: 0, True: 0}
        try:
            for piece in pieces:
                for part, block in piece_blocks(piece, feature_plan, prep, batch_rows=batch_rows):
                    assert block.Y is not None
                    m, k = sizes[part], block.X.shape[1]
                    rows = [*block.X, block.Y[0]]
                    if block.weight is not None:
                        rows.append(block.weight[0].astype(target))
                        weight_sums[part] += math.fsum(block.weight[0])
                    fd = handles[part].fileno()
                    for j, row in enumerate(rows):  # row j of (height, m) at [start, start + k)
                        _write_all(fd, row, offsets[part] + (j * m + start[part]) * target.itemsize)
                    start[part] += k
            for handle in handles.values():
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            for handle in handles.values():
                handle.close()
        if not feature_plan.weighted:
            weight_sums = {part: float(m) for part, m in sizes.items()}
        meta: dict[str, Any] = {
            "format": CACHE_FORMAT,
            "input_files": [str(p) for p in plan.files],
            "plan": feature_plan.to_json(),
            "dtype": prep.dtype,
            "n_examples": {PARTS[part]: m for part, m in sizes.items()},
            "weight_sums": {PARTS[part]: total for part, total in weight_sums.items()},
        }
        durable.write_bytes(building / "meta.json", json.dumps(meta, default=str).encode())
        try:
            durable.rename(building, path)
        except OSError:
            if not (path / "meta.json").is_file():  # not a concurrent run's identical cache
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _write_all(fd: int, row: np.ndarray, offset: int) -> None:
    view = np.ascontiguousarray(row).data.cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class StreamLoss:
    """A :class:`lr_kernel.LossFunction` over a stream cache, read in chunks each call.

    Each chunk of ``chunk_examples`` columns is read into one of two reused
    buffers of shape ``(n_features + 1 [+ 1], chunk_examples)`` while the other is
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
        weighted: bool = False,
        weight_sum: float | None = None,
        n_threads: int = 1,
    ) -> None:
        self._n = n_features
        self._m = n_examples
        self._weighted = weighted
        self._height = n_features + 1 + weighted
        self._weight_sum = float(n_examples if weight_sum is None else weight_sum)
        self._dtype = np.dtype(dtype)
        self._n_threads = n_threads
        chunk = min(chunk_examples, n_examples)
        self._ranges = [(s, min(s + chunk, n_examples)) for s in range(0, n_examples, chunk)]
        self._fd = os.open(path, os.O_RDONLY)
        with open(path, "rb") as handle:
            np.lib.format.read_magic(handle)
            shape, _, descr = np.lib.format.read_array_header_1_0(handle)
            self._offset = handle.tell()
        expected = (self._height, n_examples)
        if shape != expected or descr != self._dtype:
            raise ValueError(f"{path}: cache holds {shape} {descr}, not {expected} {self._dtype}")
        self._buffers = [np.empty((self._height, chunk), self._dtype) for _ in range(2)]
        self._losses: dict[tuple[int, int], FusedLoss] = {}
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrflow-read")

    @property
    def n_features(self) -> int:
        return self._n

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """``(X, Y, weight)`` views of shapes ``(n, k)``, ``(1, k)`` and ``(1, k)`` (or None)
        for each chunk, in order. A view is overwritten once the next one is requested.
        """
        for index, k in self._buffer_order():
            buffer = self._buffers[index]
            weight = buffer[self._n + 1 :, :k] if self._weighted else None
            yield buffer[: self._n, :k], buffer[self._n : self._n + 1, :k], weight

    @property
    def weight_sum(self) -> float:
        return self._weight_sum

    def _sums(self, w: np.ndarray, b: float, hessian: bool = False) -> PartialSums:
        """Each chunk's partial sums (with its Hessian's), added in chunk order."""
        sums = PartialSums()
        for index, k in self._buffer_order():
            loss = self._loss(index, k)
            sums.add(loss.hessian_sums(w, b) if hessian else loss.partial_sums(w, b))
        return sums

    def __call__(self, w: np.ndarray, b: float, l2: float = 0.0) -> tuple[float, np.ndarray, float]:
        return self._sums(w, b).loss(w, l2, self._weight_sum, self._dtype)

    def hessian(
        self, w: np.ndarray, b: float, l2: float = 0.0
    ) -> tuple[float, np.ndarray, float, np.ndarray]:
        return self._sums(w, b, hessian=True).hessian(w, l2, self._weight_sum, self._dtype)

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
        for j in range(self._height):
            view = buffer[j, : stop - start].data.cast("B")
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
                buffer[: self._n, :k],
                buffer[self._n : self._n + 1, :k],
                sample_weight=buffer[self._n + 1 :, :k] if self._weighted else None,
                n_threads=self._n_threads,
            )
        return self._losses[key]
