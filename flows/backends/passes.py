"""The two passes every backend makes over its rows: summaries, then blocks through the plan.

A backend only decides where its pieces of the input are read (all in this
process, in a stream, or on Dask workers) and where the blocks go (a matrix in
memory, a cache on disk, a worker's shard). What a row becomes is decided here
and in :mod:`flows.features`, for every backend alike.
"""

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import polars as pl

from flows.config import TrainConfig
from flows.dataset import InputPlan, Piece, held_out, iter_batches
from flows.errors import DataError
from flows.features import (
    Block,
    FeaturePlan,
    PlanSettings,
    Summary,
    apply_plan,
    learn_plan,
    summarize,
)


def settings_of(config: TrainConfig, plan: InputPlan) -> PlanSettings:
    """The plan settings of a run: the parts of the config that shape ``X``."""
    return PlanSettings(
        choice=plan.choice,
        label_dtype=plan.label_dtype,
        where=str(plan.where),
        validation_fraction=config.effective_validation_fraction,
        seed=config.seed,
        max_levels=config.max_levels,
        missing=config.missing,
        standardize=config.standardize,
        positive_label=config.positive_label,
        class_weight=config.class_weight,
        dtype=config.dtype,
    )


def split(frame: pl.DataFrame, mask: np.ndarray | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The batch's training rows and held-out rows (``mask`` True), order kept."""
    if mask is None:
        return frame, frame.clear()
    if mask.all():
        return frame.clear(), frame
    keep = pl.Series(mask)
    return frame.filter(~keep), frame.filter(keep)


def split_batches(
    piece: Piece, prep: PlanSettings, batch_rows: int | None = None
) -> Iterator[tuple[bool, pl.DataFrame]]:
    """``(held out?, rows)`` of each batch of the piece, training rows first; no empty parts."""
    for first, frame in iter_batches(piece, prep.choice.read, batch_rows or prep.batch_rows()):
        mask = held_out(piece.role, first, frame.height, prep.validation_fraction, prep.seed)
        for is_held_out, part in zip((False, True), split(frame, mask), strict=True):
            if part.height:
                yield is_held_out, part


T = TypeVar("T")


def read_ahead(items: Iterator[T]) -> Iterator[T]:
    """``items`` in order, the next one made in a thread while the caller works on this one.

    At most two items are alive at once (the caller's and the one being made),
    as when the caller drives ``items`` itself: reading a batch (pyarrow and
    Polars release the GIL) overlaps the work on the one before at no extra
    memory. An error of ``items`` reaches the caller in its place, after the
    items before it.
    """
    ready = threading.Condition()
    made: list[tuple[str, object]] = []  # ("item" | "end" | "error", value); one at most
    state = {"taken": True, "stop": False}

    def make() -> None:
        while True:
            with ready:
                ready.wait_for(lambda: state["taken"] or state["stop"])
                if state["stop"]:
                    return
                state["taken"] = False
            try:
                result: tuple[str, object] = ("item", next(items))
            except StopIteration:
                result = ("end", None)
            except BaseException as error:  # raised in the caller, in its place
                result = ("error", error)
            with ready:
                made.append(result)
                ready.notify_all()
            if result[0] != "item":
                return

    maker = threading.Thread(target=make, name="lrflow-read-ahead", daemon=True)
    maker.start()
    try:
        while True:
            with ready:
                ready.wait_for(lambda: bool(made))
                kind, value = made.pop()
                state["taken"] = True  # the thread makes the next item meanwhile
                ready.notify_all()
            if kind == "end":
                return
            if kind == "error":
                assert isinstance(value, BaseException)
                raise value
            yield value  # type: ignore[misc]
    finally:
        with ready:
            state["stop"] = True
            ready.notify_all()
        maker.join()
        close = getattr(items, "close", None)
        if close is not None:
            close()  # the files of a caller that stopped early are closed now


def piece_batches(
    pieces: Iterable[Piece], prep: PlanSettings, batch_rows: int | None = None
) -> Iterator[tuple[int, bool, pl.DataFrame]]:
    """``(index of the piece, held out?, rows)`` of each batch of the pieces, in input order."""
    for index, piece in enumerate(pieces):
        for is_held_out, rows in split_batches(piece, prep, batch_rows):
            yield index, is_held_out, rows


def summarize_pieces(
    pieces: Sequence[Piece],
    prep: PlanSettings,
    batch_rows: int | None = None,
    ahead: bool = False,
) -> list[tuple[Summary, Summary]]:
    """The summaries of each piece's training rows and of its held-out rows.

    ``ahead``: the next batch is read in a thread (:func:`read_ahead`) while
    this one is summarized; the summaries are the same, merged in batch order.
    """
    totals = [(Summary(), Summary()) for _ in pieces]
    batches = piece_batches(pieces, prep, batch_rows)
    for index, is_held_out, rows in read_ahead(batches) if ahead else batches:
        path = pieces[index].path
        part = summarize(rows, prep.choice, path=path, max_levels=prep.max_levels)
        totals[index][is_held_out].merge(part, prep.max_levels)
    return totals


def summarize_piece(
    piece: Piece, prep: PlanSettings, batch_rows: int | None = None
) -> tuple[Summary, Summary]:
    """The summaries of a piece's training rows and of its held-out rows."""
    return summarize_pieces([piece], prep, batch_rows)[0]


def learn(
    prep: PlanSettings, train_parts: Iterable[Summary], validation_parts: Iterable[Summary]
) -> tuple[FeaturePlan, Summary, Summary]:
    """The plan from the pieces' summaries, merged in the order given (input order)."""
    train = Summary.merged(train_parts, prep.max_levels)
    validation = Summary.merged(validation_parts, prep.max_levels)
    everything = Summary.merged([train, validation], prep.max_levels)
    if prep.validation_fraction == 0 and len(train.labels) == 2:
        # Separate validation data: a label value of its own is its error, not the training
        # data's ("label has 3 distinct values" would name the training files).
        foreign = sorted(v for v in validation.labels if v not in train.labels)
        if foreign:
            known = ", ".join(repr(v) for v in sorted(train.labels))
            raise DataError(
                f"label value {foreign[0]!r} of the validation data is not one of the "
                f"training labels ({known})",
                column=prep.choice.label,
            )
    plan = learn_plan(train, everything, prep)
    if prep.validation_fraction > 0 and validation.rows == 0:
        raise DataError(
            f"too few rows to hold out a validation fraction of {prep.validation_fraction:g}; "
            "use 0 to disable validation",
            path=prep.where,
        )
    return plan, train, validation


Target = Callable[[bool, int], np.ndarray | None]


def pieces_blocks(
    pieces: Sequence[Piece],
    plan: FeaturePlan,
    prep: PlanSettings,
    target: Target | None = None,
    batch_rows: int | None = None,
    ahead: bool = False,
) -> Iterator[tuple[bool, Block]]:
    """``(held out?, block)`` for each batch of the pieces, in input order.

    ``target(held_out, k)`` may give the ``(n_terms, k)`` array each block is
    written into (a slice of the whole matrix), so no other copy is made.
    ``ahead``: the next batch is read in a thread (:func:`read_ahead`) while the
    plan is applied to this one.
    """
    batches = piece_batches(pieces, prep, batch_rows)
    for index, is_held_out, rows in read_ahead(batches) if ahead else batches:
        out = None if target is None else target(is_held_out, rows.height)
        path = pieces[index].path
        yield is_held_out, apply_plan(plan, rows, dtype=prep.dtype, path=path, out=out)


def piece_blocks(
    piece: Piece, plan: FeaturePlan, prep: PlanSettings, batch_rows: int | None = None
) -> Iterator[tuple[bool, Block]]:
    """``(held out?, block)`` for each batch of the piece, training rows first."""
    return pieces_blocks([piece], plan, prep, batch_rows=batch_rows)


def pieces_of(
    plan: InputPlan, validation: InputPlan | None, fraction: float, make: Callable[..., list[Piece]]
) -> list[Piece]:
    """The run's pieces: the training data (split by the seed, or not), then validation data."""
    pieces = make(plan, "split" if fraction > 0 else "train")
    if validation is not None:
        pieces += make(validation, "validation")
    return pieces
