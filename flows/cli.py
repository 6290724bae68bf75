"""The `lrflow` command line: validates everything cheap, then runs the Prefect flows."""

import os
import sys
from typing import Annotated

import typer
from pydantic import ValidationError

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


def _numbers(value: str, flag: str) -> float | list[float]:
    """``"0.1"`` -> 0.1, ``"0.01,0.1,1"`` -> a list to search; the config checks the values."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    try:
        numbers = [float(part) for part in parts]
        if not numbers:
            raise ValueError
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a number or a comma-separated list of numbers", param_hint=flag
        ) from None
    return numbers[0] if len(numbers) == 1 else numbers


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
    learning_rate: Annotated[
        str, typer.Option(help="Step size, or a comma-separated list to search (e.g. 0.1,1).")
    ] = "0.5",
    l2: Annotated[
        str,
        typer.Option(
            help="L2 penalty strength (the intercept is not penalized), or a comma-separated "
            "list to search: every l2 with every learning rate, chosen by validation log-loss."
        ),
    ] = "0.0",
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
) -> None:
    """Train on Parquet data; write params.parquet, cost_history.parquet, metrics.parquet."""
    config = TrainConfig(
        data=data,
        output=output,
        label=label,
        features=_split(features),
        positive_label=positive_label,
        iterations=iterations,
        learning_rate=_numbers(learning_rate, "--learning-rate"),
        l2=_numbers(l2, "--l2"),
        tol=tol,
        optimizer=optimizer,  # type: ignore[arg-type]  # validated by the model
        threads=threads,
        standardize=standardize,
        dtype=dtype,  # type: ignore[arg-type]  # validated by the model
    )
    # Every input check runs before Prefect (seconds to start) is even imported:
    # paths, schemas and columns from the footers, then the values in one streamed
    # aggregate query that holds no data. The flow repeats them for scheduled runs.
    plan = plan_inputs(config.data, config.label, config.features)
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
    if summary.selected is not None:
        typer.echo(
            f"selected l2 {summary.selected['l2']:g}, learning rate "
            f"{summary.selected['learning_rate']:g} of {summary.selected['candidates']:.0f} "
            f"candidates (validation log-loss {summary.selected['validation_log_loss']:.6g})"
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
