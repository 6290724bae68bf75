"""The project's one exception family: bad input or a failed run, with the culprit named."""

import unicodedata


class LrflowError(ValueError):
    """Base of every error the pipeline raises on purpose; ``str()`` is one line for the user."""


class DataError(LrflowError):
    """Input the pipeline cannot use: names the file, the column and the problem.

    ``str(error)`` is the single line shown to the user, e.g.
    ``data/a.parquet: column 'age': 3 null values``.
    """

    def __init__(self, problem: str, *, path: object = None, column: str | None = None) -> None:
        self.path = None if path is None else str(path)
        self.column = column
        self.problem = problem
        where = [p for p in (self.path, column is not None and f"column {column!r}") if p]
        super().__init__(one_line(": ".join([*where, problem])))

    # Keeps the keyword arguments when pickled (Prefect results).
    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (self.problem, self.path, self.column))


class DivergedError(LrflowError):
    """Training diverged: the learning rate is too large for this data."""


def one_line(text: str) -> str:
    """``text`` with control characters escaped: a file or column name holding a
    newline must not split the one-line error (or forge a second one)."""
    if not any(unicodedata.category(c) == "Cc" for c in text):
        return text
    return "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" else c for c in text)


def _rebuild(problem: str, path: str | None, column: str | None) -> DataError:
    return DataError(problem, path=path, column=column)
