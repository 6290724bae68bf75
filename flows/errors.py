"""The project's one exception family: bad input or a failed run, with the culprit named."""


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
        where = [part for part in (self.path, column and f"column {column!r}") if part]
        super().__init__(": ".join([*where, problem]))

    def __reduce__(self):  # keeps the keyword arguments when pickled (Prefect results)
        return (_rebuild, (self.problem, self.path, self.column))


class DivergedError(LrflowError):
    """Training diverged: the learning rate is too large for this data."""


def _rebuild(problem: str, path: str | None, column: str | None) -> DataError:
    return DataError(problem, path=path, column=column)
