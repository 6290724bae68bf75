"""``X`` stored in tiles of examples: the layout the compiled engine reads at memory speed.

A :class:`TiledMatrix` is the ``(n_features, n_examples)`` matrix ``X`` held as
``tiles`` of shape ``(n_tiles, n_features, width)``: tile ``t`` is
``X[:, t * width : (t + 1) * width]``, C-contiguous, the last one padded with
zeros. Every tile is one contiguous run of memory, so a pass over ``X`` tile
by tile is a single sequential stream (the hardware prefetcher and one
software prefetch per line keep the memory busy), where the plain ``(n, m)``
layout makes ``n`` streams that restart at every block.

Why (``benchmarks/RESULTS.md``, issue 14 run 6): on the project's 2-core
machine, the forward product alone over a C-contiguous ``(n, m)`` ``X``
reached 0.76-0.83 of one core's sequential read, whatever the loop (rows
eight at a time, or all rows per tile with software prefetch); over tiles it
reached 0.97-1.0, and the whole loss pass went from 0.52-0.55 to 0.77 of the
read on one thread.

It is a matrix for the kernel's purposes, not an ndarray: ``A @ X``,
``X @ B``, ``X[:, a:b]`` (a copy), ``X[j]`` (a row, a copy), ``shape``,
``dtype``. Converting it to an ndarray would copy all of ``X``, so
``np.asarray`` refuses; :meth:`TiledMatrix.to_array` does it when asked.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

# A tile's row: this many 64-byte vectors (lines) of one feature's examples, so
# that the compiled loop holds a tile's scores in 24 AVX-512 registers. Wide
# data takes narrower tiles (8 lines) so that a tile stays within ~512 KiB,
# half of a core's L2, where the backward product reads it again.
TILE_LINES = 24
NARROW_TILE_LINES = 8
TILE_BYTES_MAX = 512 << 10
# Tiles of a product (``A @ X``, ``X @ B``) per NumPy call: bounds the temporaries.
PRODUCT_TILES = 64


def tile_width(n_features: int, dtype: np.dtype[np.floating]) -> int:
    """Examples per tile: 24 lines of ``dtype`` (192 float64, 384 float32), or 8 for wide data."""
    per_line = 64 // dtype.itemsize
    lines = TILE_LINES if n_features * TILE_LINES * 64 <= TILE_BYTES_MAX else NARROW_TILE_LINES
    return lines * per_line


class TiledMatrix:
    """``X`` ``(n_features, n_examples)`` as ``tiles`` ``(n_tiles, n_features, width)``.

    Parameters
    ----------
    tiles : ndarray of shape (n_tiles, n_features, width), float32 or float64
        C-contiguous; columns past ``n_examples`` in the last tile are zero.
    n_examples : int
        ``(n_tiles - 1) * width < n_examples <= n_tiles * width``.
    """

    ndim = 2
    # ndarray's operators defer to this class's (``A @ X`` calls ``__rmatmul__``).
    __array_ufunc__ = None

    def __init__(self, tiles: np.ndarray, n_examples: int) -> None:
        if tiles.ndim != 3 or not tiles.flags.c_contiguous:
            raise ValueError("tiles must be a C-contiguous (n_tiles, n_features, width) array")
        if tiles.dtype not in (np.float32, np.float64):
            raise ValueError(f"tiles must be float32 or float64, got {tiles.dtype}")
        n_tiles, _, width = tiles.shape
        if not (n_tiles - 1) * width < n_examples <= n_tiles * width:
            raise ValueError(f"{n_examples} examples do not fill {n_tiles} tiles of {width}")
        self.tiles = tiles
        self.width = int(width)
        self.n_examples = int(n_examples)

    @classmethod
    def empty(
        cls,
        n_features: int,
        n_examples: int,
        dtype: np.dtype[np.floating] | type,
        allocate: Callable[[tuple[int, int], np.dtype[Any]], np.ndarray] | None = None,
    ) -> "TiledMatrix":
        """Uninitialized, but for the last tile's padding (zero).

        ``allocate((rows, columns), dtype)`` makes the storage (as one 2D
        buffer, reshaped to tiles); default ``np.empty``.
        """
        dtype = np.dtype(dtype)
        width = tile_width(n_features, dtype)
        n_tiles = max(1, -(-n_examples // width))
        shape = (n_tiles * n_features, width)
        flat = np.empty(shape, dtype) if allocate is None else allocate(shape, dtype)
        tiles = flat.reshape(n_tiles, n_features, width)
        tiles[-1, :, n_examples - (n_tiles - 1) * width :] = 0
        return cls(tiles, n_examples)

    @classmethod
    def from_array(cls, X: np.ndarray) -> "TiledMatrix":
        """A tiled copy of ``X`` ``(n_features, n_examples)``."""
        n, m = X.shape
        tiled = cls.empty(n, m, X.dtype)
        tiled.set_columns(0, X)
        return tiled

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.tiles.shape[1]), self.n_examples

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.tiles.dtype

    @property
    def size(self) -> int:
        return self.shape[0] * self.n_examples

    @property
    def nbytes(self) -> int:
        return int(self.tiles.nbytes)

    @property
    def n_tiles(self) -> int:
        return int(self.tiles.shape[0])

    def __repr__(self) -> str:
        n, m = self.shape
        return f"TiledMatrix(({n}, {m}), {self.dtype}, {self.n_tiles} tiles of {self.width})"

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(
            "a TiledMatrix is not converted implicitly (that would copy all of X): "
            "use to_array(), or the products A @ X and X @ B"
        )

    def set_columns(self, start: int, values: np.ndarray) -> None:
        """``X[:, start : start + k] = values`` for ``values`` of shape ``(n_features, k)``."""
        n, k = values.shape
        if n != self.shape[0] or not 0 <= start <= start + k <= self.n_examples:
            raise ValueError(f"columns [{start}, {start + k}) of shape {values.shape} do not fit")
        width, done = self.width, 0
        while done < k:
            t, offset = divmod(start + done, width)
            step = min(width - offset, k - done)
            self.tiles[t, :, offset : offset + step] = values[:, done : done + step]
            done += step

    def columns(self, start: int, stop: int) -> np.ndarray:
        """``X[:, start:stop]`` as a new C-contiguous ``(n_features, stop - start)`` array."""
        start, stop, _ = slice(start, stop).indices(self.n_examples)
        stop = max(start, stop)
        out = np.empty((self.shape[0], stop - start), self.dtype)
        width, done = self.width, 0
        while start + done < stop:
            t, offset = divmod(start + done, width)
            step = min(width - offset, stop - start - done)
            out[:, done : done + step] = self.tiles[t, :, offset : offset + step]
            done += step
        return out

    def row(self, j: int) -> np.ndarray:
        """``X[j]``: feature ``j`` over every example, a new ``(n_examples,)`` array."""
        return self.tiles[:, j, :].reshape(-1)[: self.n_examples].copy()

    def to_array(self) -> np.ndarray:
        """``X`` as a C-contiguous ndarray: a copy of all of it."""
        return self.columns(0, self.n_examples)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, int | np.integer):
            return self.row(int(key))
        if (
            isinstance(key, tuple)
            and len(key) == 2
            and key[0] == slice(None)
            and isinstance(key[1], slice)
            and key[1].step in (None, 1)
        ):
            start, stop, _ = key[1].indices(self.n_examples)
            return self.columns(start, stop)
        raise TypeError(f"a TiledMatrix takes X[j] or X[:, a:b], not X[{key!r}]")

    def __rmatmul__(self, A: Any) -> NDArray[Any]:
        """``A @ X`` for ``A`` of shape ``(n_features,)`` or ``(p, n_features)``."""
        A = np.asarray(A)
        vector = A.ndim == 1
        A2 = A.reshape(1, -1) if vector else A
        n = self.shape[0]
        if A2.ndim != 2 or A2.shape[1] != n:
            raise ValueError(f"A @ X needs A of shape (p, {n}), got {A.shape}")
        p, width = A2.shape[0], self.width
        dtype = np.result_type(A2.dtype, self.dtype)
        out = np.empty((p, self.n_tiles * width), dtype)
        for t0 in range(0, self.n_tiles, PRODUCT_TILES):
            t1 = min(t0 + PRODUCT_TILES, self.n_tiles)
            part = np.matmul(A2, self.tiles[t0:t1])  # (g, p, width)
            out[:, t0 * width : t1 * width] = part.transpose(1, 0, 2).reshape(p, -1)
        out = out[:, : self.n_examples]
        return out[0] if vector else out

    def __matmul__(self, B: Any) -> NDArray[Any]:
        """``X @ B`` for ``B`` of shape ``(n_examples,)`` or ``(n_examples, p)``."""
        B = np.asarray(B)
        vector = B.ndim == 1
        B2 = B.reshape(-1, 1) if vector else B
        m, width = self.n_examples, self.width
        if B2.ndim != 2 or B2.shape[0] != m:
            raise ValueError(f"X @ B needs B of shape ({m}, p), got {B.shape}")
        p = B2.shape[1]
        dtype = np.result_type(B2.dtype, self.dtype)
        out = np.zeros((self.shape[0], p), dtype)
        for t0 in range(0, self.n_tiles, PRODUCT_TILES):
            t1 = min(t0 + PRODUCT_TILES, self.n_tiles)
            rows = B2[t0 * width : t1 * width]
            if rows.shape[0] < (t1 - t0) * width:  # the last tile's padding: zero rows
                rows = np.concatenate([rows, np.zeros(((t1 - t0) * width - rows.shape[0], p))])
            part = np.matmul(self.tiles[t0:t1], rows.reshape(t1 - t0, width, p).astype(dtype))
            out += part.sum(axis=0)  # (n, p)
        return out[:, 0] if vector else out
