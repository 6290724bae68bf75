"""The two passes every backend makes over its rows: summaries, then blocks through the plan.

A backend only decides where its pieces of the input are read (all in this
process, in a stream, or on Dask workers) and where the blocks go (a matrix in
memory, a cache on disk, a worker's shard). What a row becomes is decided here
and in :mod:`flows.features`, for every backend alike.
"""

from collections.abc import Callable, Iterable, Iterator

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


def summarize_piece(
    piece: Piece, prep: PlanSettings, batch_rows: int | None = None
) -> tuple[Summary, Summary]:
    """The summaries of a piece's training rows and of its held-out rows."""
    totals = {False: Summary(), True: Summary()}
    for is_held_out, rows in split_batches(piece, prep, batch_rows):
        part = summarize(rows, prep.choice, path=piece.path, max_levels=prep.max_levels)
        totals[is_held_out].merge(part, prep.max_levels)
    return totals[False], totals[True]


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


def piece_blocks(
    piece: Piece,
    plan: FeaturePlan,
    prep: PlanSettings,
    target: Target | None = None,
    batch_rows: int | None = None,
) -> Iterator[tuple[bool, Block]]:
    """``(held out?, block)`` for each batch of the piece, training rows first.

    ``target(held_out, k)`` may give the ``(n_terms, k)`` array each block is
    written into (a slice of the whole matrix), so no other copy is made.
    """
    for is_held_out, rows in split_batches(piece, prep, batch_rows):
        out = None if target is None else target(is_held_out, rows.height)
        yield is_held_out, apply_plan(plan, rows, dtype=prep.dtype, path=piece.path, out=out)


def pieces_of(
    plan: InputPlan, validation: InputPlan | None, fraction: float, make: Callable[..., list[Piece]]
) -> list[Piece]:
    """The run's pieces: the training data (split by the seed, or not), then validation data."""
    pieces = make(plan, "split" if fraction > 0 else "train")
    if validation is not None:
        pieces += make(validation, "validation")
    return pieces
