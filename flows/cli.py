"""The `lrflow` command line: validates everything cheap, then runs the Prefect flows."""

import os
import sys
from typing import Annotated

import typer
from pydantic import ValidationError

from flows.backends import resolve_backend
from flows.config import TrainConfig
from flows.dataset import plan_inputs, scan, validate_values
from flows.errors import DataError, LrflowError

app = typer.Typer(
    name="lrflow",
    help="Train logistic regression on Parquet data with a vectorized NumPy kernel, on Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1


@app.callback()
def _commands() -> None:
    """Train logistic regression on Parquet data with a vectorized NumPy kernel, on Prefect."""


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


@app.command()
def train(
    data: Annotated[str, typer.Option(help="Parquet file, directory of Parquet files, or glob.")],
    output: Annotated[str, typer.Option(help="Directory to write the results to.")],
    label: Annotated[str, typer.Option(help="Label column.")] = "label",
    features: Annotated[
        str | None, typer.Option(help="Comma-separated feature columns [default: all numeric].")
    ] = None,
    positive_label: Annotated[
        str | None, typer.Option(help="Label value of the positive class [default: the larger].")
    ] = None,
    iterations: Annotated[int, typer.Option(help="Most gradient updates.")] = 1000,
    learning_rate: Annotated[float, typer.Option(help="Step size.")] = 0.5,
    l2: Annotated[
        float, typer.Option(help="L2 penalty strength (the intercept is not penalized).")
    ] = 0.0,
    tol: Annotated[
        float, typer.Option(help="Stop when the cost changes by less than this.")
    ] = 1e-10,
    optimizer: Annotated[
        str, typer.Option(help="gd, nesterov or lbfgs (lbfgs ignores --learning-rate).")
    ] = "gd",
    threads: Annotated[
        int | None, typer.Option(help="Kernel threads [default: the available cores].")
    ] = None,
    standardize: Annotated[
        bool, typer.Option("--standardize/--no-standardize", help="Train on standardized features.")
    ] = True,
    dtype: Annotated[str, typer.Option(help="float64 or float32.")] = "float64",
    backend: Annotated[
        str,
        typer.Option(help="auto, memory, stream or dask [auto: memory if it fits the budget]."),
    ] = "auto",
    memory_budget: Annotated[
        str | None,
        typer.Option(help="Memory the data may take, e.g. 256MB, 2GiB [default: half the RAM]."),
    ] = None,
    cache_dir: Annotated[
        str | None, typer.Option(help="Directory of the stream cache [default: $TMPDIR].")
    ] = None,
    cleanup_cache: Annotated[
        bool,
        typer.Option("--cleanup-cache/--keep-cache", help="Delete the stream cache after the run."),
    ] = False,
    dask_address: Annotated[
        str | None,
        typer.Option(help="Dask scheduler tcp://HOST:PORT [default: start a LocalCluster]."),
    ] = None,
    dask_workers: Annotated[int, typer.Option(help="Workers of the LocalCluster.")] = 2,
) -> None:
    """Train on Parquet data; write params.parquet, cost_history.parquet, metrics.parquet."""
    config = TrainConfig(
        data=data,
        output=output,
        label=label,
        features=_split(features),
        positive_label=positive_label,
        iterations=iterations,
        learning_rate=learning_rate,
        l2=l2,
        tol=tol,
        optimizer=optimizer,  # type: ignore[arg-type]  # validated by the model
        threads=threads,
        standardize=standardize,
        dtype=dtype,  # type: ignore[arg-type]  # validated by the model
        backend=backend,  # type: ignore[arg-type]  # validated by the model
        memory_budget=memory_budget,  # type: ignore[arg-type]  # parsed by the model
        cache_dir=cache_dir,
        cleanup_cache=cleanup_cache,
        dask_address=dask_address,
        dask_workers=dask_workers,
    )
    # Every input check runs before Prefect (seconds to start) is even imported:
    # paths, schemas and columns from the footers, then the values in one streamed
    # aggregate query that holds no data. The flow repeats them for scheduled runs.
    plan = plan_inputs(config.data, config.label, config.features)
    # Polars' query holds the columns in memory: out-of-core and Dask runs check
    # the values in their own bounded first pass, inside the flow, instead.
    if resolve_backend(config, plan) == "memory":
        validate_values(plan, scan(plan), config.positive_label)
    _check_output(config.output)

    # A batch job has no business phoning home; an explicit setting still wins.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.train import train as train_flow

    summary = train_flow(config)
    typer.echo(
        f"trained on {summary.n_examples} examples x {summary.n_features} features: "
        f"{summary.n_iterations} iterations ({summary.stop_reason}), "
        f"final cost {summary.final_cost:.6g}"
    )
    for path in summary.files:
        typer.echo(f"wrote {path}")


def _check_output(output: str) -> None:
    from pathlib import Path

    path = Path(output)
    if path.exists() and not path.is_dir():
        raise DataError("output exists and is not a directory", path=path)
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise DataError("output's parent is not a directory", path=parent)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line on standard error and a non-zero status for any expected failure."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="lrflow", standalone_mode=False)
    except typer.Abort:
        _fail("aborted", EXIT_RUN_FAILED)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors()
        )
        _fail(f"invalid parameters: {problems}", EXIT_BAD_INPUT)
    except DataError as error:
        _fail(str(error), EXIT_BAD_INPUT)
    except LrflowError as error:
        _fail(str(error), EXIT_RUN_FAILED)
    except Exception as error:
        # Usage errors (click's, vendored by newer typer) carry their own message.
        if callable(getattr(error, "format_message", None)):
            _fail(error.format_message(), EXIT_BAD_INPUT)
        raise


def _fail(message: str, status: int) -> None:
    print(f"lrflow: error: {message}", file=sys.stderr)
    sys.exit(status)


if __name__ == "__main__":
    main()
