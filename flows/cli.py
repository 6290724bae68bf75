"""The `lrflow` command line: validates everything cheap, then runs the Prefect flows.

Each command imports what it needs when it runs (Polars, NumPy, Prefect are
seconds together), so `lrflow --help` and `lrflow server status` answer at once.
"""

import atexit
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from flows.errors import DataError, LrflowError, one_line

app = typer.Typer(
    name="lrflow",
    help="Train logistic regression on Parquet data with a vectorized NumPy kernel, on Prefect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help (click's): it wraps descriptions instead of cutting flag names at
    # 80 columns, and shows "[default: ...]" as text, not as markup.
    rich_markup_mode=None,
)

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1
EXIT_NOT_RUNNING = 3  # `lrflow server status`, as systemctl and LSB init scripts


@app.callback()
def _commands() -> None:
    """Train logistic regression on Parquet data with a vectorized NumPy kernel, on Prefect."""


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _numbers(value: str, flag: str) -> float | str | list[float]:
    """``"0.1"`` -> 0.1, ``"0.01,0.1,1"`` -> a list to search; the config checks the values."""
    if value.strip().lower() == "auto":
        return "auto"
    parts = [part.strip() for part in value.split(",") if part.strip()]
    try:
        numbers = [float(part) for part in parts]
        if not numbers:
            raise ValueError
    except ValueError:
        allowed = "a positive finite number or 'auto'" if flag == "--learning-rate" else "a number"
        raise typer.BadParameter(
            f"{value!r} is not {allowed}, nor a comma-separated list of numbers", param_hint=flag
        ) from None
    return numbers[0] if len(numbers) == 1 else numbers


@app.command()
def train(
    data: Annotated[str, typer.Option(help="Parquet file, directory of Parquet files, or glob.")],
    output: Annotated[str, typer.Option(help="Directory to write the results to.")],
    label: Annotated[str, typer.Option(help="Label column.")] = "label",
    features: Annotated[
        str | None,
        typer.Option(
            help="Exactly these comma-separated feature columns [default: every column of a "
            "supported type but the label, the weight and --exclude]."
        ),
    ] = None,
    exclude: Annotated[
        str | None,
        typer.Option(help="Comma-separated columns never to use as features (keys, leaks)."),
    ] = None,
    missing: Annotated[
        str,
        typer.Option(
            help="Nulls in features: error, or impute (numeric: the training mean plus a "
            "'col=(missing)' term; categorical: a '(missing)' level)."
        ),
    ] = "error",
    max_levels: Annotated[
        int, typer.Option(help="Most distinct values of a string/categorical feature.")
    ] = 100,
    weight: Annotated[
        str | None, typer.Option(help="Column of row weights (finite, >= 0).")
    ] = None,
    class_weight: Annotated[
        str | None,
        typer.Option(help="balanced: weight each row m / (2 m_class), as scikit-learn."),
    ] = None,
    positive_label: Annotated[
        str | None, typer.Option(help="Label value of the positive class [default: the larger].")
    ] = None,
    iterations: Annotated[int, typer.Option(help="Most gradient updates.")] = 1000,
    learning_rate: Annotated[
        str,
        typer.Option(
            help="Step size, a comma-separated list to search (e.g. 0.1,1), or 'auto' for "
            "one estimated from the data."
        ),
    ] = "0.5",
    l2: Annotated[
        str,
        typer.Option(
            help="L2 penalty strength (the intercept is not penalized), or a comma-separated "
            "list to search: every l2 with every learning rate, chosen by validation log-loss."
        ),
    ] = "0.0",
    tol: Annotated[
        float, typer.Option(help="Converged when every gradient component is <= this.")
    ] = 1e-8,
    optimizer: Annotated[
        str,
        typer.Option(
            help="auto (newton up to 200 terms, else lbfgs), newton, lbfgs, nesterov or gd "
            "(the first three ignore --learning-rate)."
        ),
    ] = "auto",
    confidence: Annotated[
        float, typer.Option(help="Level of the Wald intervals (ci_lower, ci_upper).")
    ] = 0.95,
    drop_aliased: Annotated[
        bool,
        typer.Option(
            "--drop-aliased",
            help="Drop exactly collinear terms, refit, and record null estimates for them "
            "[default: fail naming them].",
        ),
    ] = False,
    threads: Annotated[
        int | None, typer.Option(help="Kernel threads [default: the available cores].")
    ] = None,
    engine: Annotated[
        str,
        typer.Option(
            help="Kernel engine: auto, numpy or numba [auto: the compiled numba loop for "
            "large in-memory data on 2+ threads]."
        ),
    ] = "auto",
    checkpoint_every: Annotated[
        int, typer.Option(help="Save a checkpoint every N iterations (0: never).")
    ] = 1000,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the output directory's checkpoint.")
    ] = False,
    standardize: Annotated[
        bool, typer.Option("--standardize/--no-standardize", help="Train on standardized features.")
    ] = True,
    dtype: Annotated[str, typer.Option(help="float64 or float32.")] = "float64",
    validation_fraction: Annotated[
        float | None,
        typer.Option(help="Share of rows held out, stratified by label [default: 0.2]; 0: none."),
    ] = None,
    validation_data: Annotated[
        str | None, typer.Option(help="Separate validation data instead of a split.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the validation split.")] = 0,
    validation_every: Annotated[
        int, typer.Option(help="Record the validation cost every this many iterations.")
    ] = 10,
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
    promote: Annotated[
        str,
        typer.Option(
            help="always, or if-better: latest.json names the new run only if its validation "
            "log-loss is at most the current model's x (1 + --promote-tolerance)."
        ),
    ] = "if-better",
    promote_tolerance: Annotated[
        float, typer.Option(help="Relative slack of if-better (0.01: 1% worse still promotes).")
    ] = 0.01,
    keep_runs: Annotated[
        int | None,
        typer.Option(help="Keep the newest N run directories (and the promoted one) [all]."),
    ] = None,
) -> None:
    """Train on Parquet data; write params.parquet, cost_history.parquet, metrics.parquet."""
    from flows.backends import check_values, plan_run, resolve_backend
    from flows.config import TrainConfig
    from flows.storage import location
    from flows.store import check_store

    config = TrainConfig(
        data=data,
        output=output,
        label=label,
        features=_split(features),
        exclude=_split(exclude) or [],
        missing=missing,  # type: ignore[arg-type]  # validated by the model
        max_levels=max_levels,
        weight=weight,
        class_weight=class_weight,  # type: ignore[arg-type]  # validated by the model
        positive_label=positive_label,
        iterations=iterations,
        learning_rate=_numbers(learning_rate, "--learning-rate"),  # type: ignore[arg-type]
        l2=_numbers(l2, "--l2"),  # type: ignore[arg-type]  # validated by the model
        tol=tol,
        optimizer=optimizer,  # type: ignore[arg-type]  # validated by the model
        confidence=confidence,
        drop_aliased=drop_aliased,
        threads=threads,
        engine=engine,  # type: ignore[arg-type]  # validated by the model
        checkpoint_every=checkpoint_every,
        resume=resume,
        standardize=standardize,
        dtype=dtype,  # type: ignore[arg-type]  # validated by the model
        validation_fraction=validation_fraction,
        validation_data=validation_data,
        seed=seed,
        validation_every=validation_every,
        backend=backend,  # type: ignore[arg-type]  # validated by the model
        memory_budget=memory_budget,  # type: ignore[arg-type]  # parsed by the model
        cache_dir=cache_dir,
        cleanup_cache=cleanup_cache,
        dask_address=dask_address,
        dask_workers=dask_workers,
        promote=promote,  # type: ignore[arg-type]  # validated by the model
        promote_tolerance=promote_tolerance,
        keep_runs=keep_runs,
    )
    # Every input check runs before Prefect (seconds to start) is even imported:
    # paths, schemas and columns from the footers, then the values, then the store.
    # The flow repeats them for scheduled runs.
    plan, _ = plan_run(config)
    _check_output(config.output)
    # Data that fits in memory is small enough to check in full first: the same
    # bounded first pass the run makes. Out-of-core and Dask runs make theirs
    # inside the flow instead (a pass over data of that size is the run's job).
    if resolve_backend(config, plan) == "memory":
        check_values(config)
    check_store(location(config.output))

    # A batch job has no business phoning home; an explicit setting still wins.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Concurrent runs start their servers one at a time (flows.server); the wait for
    # the lock is not counted, but a busy machine can still need more than 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.server import connect

    connect()  # before Prefect is imported: it reads PREFECT_API_URL then
    from flows.artifacts import progress_listener
    from flows.train import train as train_flow

    bar = LongRunProgressBar()
    token = progress_listener.set(bar)
    try:
        with heartbeat_not_awaited():
            summary = train_flow(config)
    finally:
        progress_listener.reset(token)
        bar.close()
    for column, role, detail in summary.columns:
        typer.echo(f"column {column!r}: {role} ({detail})")
    for warning in [*summary.warnings, *summary.diagnostics]:
        typer.echo(f"lrflow: warning: {warning}", err=True)
    typer.echo(
        f"trained on {summary.n_examples} examples x {summary.n_features} terms: "
        f"{summary.n_iterations} iterations ({summary.stop_reason}), "
        f"final cost {summary.final_cost:.6g}"
    )
    if summary.selected is not None:
        typer.echo(
            f"selected l2 {summary.selected['l2']:g}, learning rate "
            f"{summary.selected['learning_rate']:g} of {summary.selected['candidates']:.0f} "
            f"candidates (validation log-loss {summary.selected['validation_log_loss']:.6g})"
        )
    for split, metrics in summary.metrics.items():
        typer.echo(
            f"{split} ({int(metrics['n_examples'])} examples): log_loss {metrics['log_loss']:.6g}, "
            f"accuracy {metrics['accuracy']:.4f}, roc_auc {metrics['roc_auc']:.4f}"
        )
    for path in summary.files:
        typer.echo(f"wrote {path}")
    typer.echo(f"run {Path(str(summary.run)).name}: {summary.promotion}")


@app.command()
def serve(
    deployment: Annotated[
        str,
        typer.Option(help="Train deployment of prefect.yaml whose schedule and parameters to use."),
    ] = "nightly",
    file: Annotated[str, typer.Option(help="The prefect.yaml to read.")] = "prefect.yaml",
) -> None:
    """Run a prefect.yaml train deployment from this process: no work pool, no worker.

    Registers the deployment as `train/<deployment>-serve` with the same schedule,
    parameters and concurrency limit, then runs its flow runs until Ctrl-C. Runs
    show in the UI of the server PREFECT_API_URL points at.
    """
    from pathlib import Path

    from flows.serve import train_deployment

    spec = train_deployment(Path(file), deployment)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.server import use_running_server

    use_running_server()
    from prefect.schedules import Cron

    from flows.train import train as train_flow

    train_flow.serve(
        name=f"{spec.name}-serve",
        schedules=[Cron(s.cron, timezone=s.timezone, active=s.active) for s in spec.schedules],
        parameters=spec.parameters,
        global_limit=spec.concurrency_limit,
        description=spec.description,
        tags=list(spec.tags),
    )


class LongRunProgressBar:
    """A progress bar on standard error for training that runs long; silent otherwise.

    It appears only once training has run ``delay_seconds`` and only on a
    terminal, so short runs and logs stay as they were.
    """

    def __init__(self, delay_seconds: float = 2.0, console: Any = None) -> None:
        from rich.console import Console

        self._console = console if console is not None else Console(stderr=True)
        self._delay = delay_seconds
        self._started_at: float | None = None
        self._progress: Any = None
        self._task: Any = None

    def __call__(self, iteration: int, total: int, cost: float) -> None:
        now = time.monotonic()
        if self._started_at is None:
            self._started_at = now
        if self._progress is None:
            if now - self._started_at < self._delay or not self._console.is_terminal:
                return
            from rich import progress

            self._progress = progress.Progress(
                progress.TextColumn("training"),
                progress.BarColumn(),
                progress.MofNCompleteColumn(),
                progress.TextColumn("cost {task.fields[cost]}"),
                progress.TimeRemainingColumn(),
                console=self._console,
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("fit", total=total, cost="")
        shown = "" if math.isnan(cost) else f"{cost:.6g}"  # NaN: the closing call
        self._progress.update(self._task, completed=iteration, cost=shown)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@app.command()
def score(
    model: Annotated[
        str, typer.Option(help="A model store (its latest.json) or a run directory of one.")
    ],
    data: Annotated[str, typer.Option(help="Parquet file, directory of Parquet files, or glob.")],
    output: Annotated[str, typer.Option(help="Parquet file to write the predictions to.")],
    threshold: Annotated[
        float, typer.Option(help="Predict the positive label when probability >= this.")
    ] = 0.5,
    unseen: Annotated[
        str,
        typer.Option(
            help="A categorical level not seen in training: reference (score it as the "
            "reference level, counted) or error."
        ),
    ] = "reference",
) -> None:
    """Score Parquet data with a trained model; write keys, probability and prediction."""
    from flows.config import ScoreConfig

    config = ScoreConfig(
        model=model,
        data=data,
        output=output,
        threshold=threshold,
        unseen=unseen,  # type: ignore[arg-type]  # validated by the model
    )
    # The same rule as train: every check that needs no pass over the data runs
    # before Prefect starts (the model, the columns and types, footer null counts).
    # NaN/inf need a pass over the values, so scoring itself finds them.
    from flows.scoring import check_output_file, load_model, plan_scoring
    from flows.store import resolve_model

    plan_scoring(load_model(resolve_model(config.model)), config.data, unseen=config.unseen)
    check_output_file(config.output)

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from flows.server import connect

    connect()
    from flows.score import score as score_flow

    with heartbeat_not_awaited():
        summary = score_flow(config)
    typer.echo(
        f"scored {summary.n_rows} rows: {summary.n_positive} predicted positive, "
        f"mean probability {summary.mean_probability:.6g}"
    )
    for column, count in summary.unseen.items():
        typer.echo(
            f"lrflow: warning: column {column!r}: {count} rows of levels not seen in training, "
            "scored as the reference level",
            err=True,
        )
    for column, count in summary.imputed.items():
        typer.echo(f"column {column!r}: {count} nulls imputed with the training mean")
    if summary.metrics is not None:
        m = summary.metrics
        typer.echo(
            f"labelled: log_loss {m['log_loss']:.6g}, accuracy {m['accuracy']:.4f}, "
            f"roc_auc {m['roc_auc']:.4f}"
        )
    typer.echo(f"wrote {summary.output} (model {summary.model})")
    if summary.metrics_file is not None:
        typer.echo(f"wrote {summary.metrics_file}")


server_app = typer.Typer(
    help="A local Prefect server kept running for later `lrflow` runs (and its UI).",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start(
    port: Annotated[
        int | None,
        typer.Option(help="Port to listen on; 0: any free one [default: 4200 if free, else any]."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
) -> None:
    """Start a Prefect server in the background; later train/score/serve runs use it.

    Its address and process are recorded in PREFECT_HOME/lrflow-server.json,
    its log in PREFECT_HOME/lrflow-server.log. Runs with PREFECT_API_URL set
    use that server instead.
    """
    from flows.server import start_server

    state, started = start_server(host=host, port=port)
    verb = "started" if started else "already running:"
    typer.echo(f"Prefect server {verb} {state.url} (pid {state.pid}; UI {state.url[:-4]})")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the server `lrflow server start` started."""
    from flows.server import stop_server

    state = stop_server()
    typer.echo("no server recorded" if state is None else f"stopped {state.url} (pid {state.pid})")


@server_app.command("status")
def server_status() -> None:
    """Say whether the recorded server is running (exit status 0) or not (3)."""
    from flows.server import read_state, running_server

    state = running_server()
    if state is not None:
        typer.echo(f"running: {state.url} (pid {state.pid}, log {state.log})")
        return
    recorded = read_state()
    stale = "" if recorded is None else f" ({recorded.url}, pid {recorded.pid}, does not answer)"
    typer.echo(f"not running{stale}")
    raise typer.Exit(EXIT_NOT_RUNNING)


def _check_output(output: str) -> None:
    from pathlib import Path

    from flows.storage import is_remote

    if is_remote(output):
        return  # check_store checks the bucket and the credentials
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise DataError("output exists and is not a directory", path=path)
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise DataError("output's parent is not a directory", path=parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError("output directory is not writable", path=parent)


@contextmanager
def heartbeat_not_awaited() -> Iterator[None]:
    """Flow runs in this block end without waiting for Prefect's heartbeat thread.

    Prefect's synchronous engine emits a heartbeat when a flow run starts, then
    sleeps in steps of one second, and at the run's end joins that thread: the
    command waits for the current step, 0.5 s on average and up to 1 s
    (benchmarks/RESULTS.md, CLI run 8). Its asynchronous engine does not join
    (``join_on_exit=False``), and neither does this: the thread is a daemon,
    stops at its next step and emits nothing after the run's final state.
    Heartbeats during the run are unchanged. A Prefect whose engine has no
    such hook runs as it is.
    """
    import inspect

    import prefect.flow_engine as flow_engine

    send_heartbeats = getattr(flow_engine, "_send_heartbeats", None)
    if (
        send_heartbeats is None
        or "join_on_exit" not in inspect.signature(send_heartbeats).parameters
    ):
        yield
        return

    @contextmanager
    def unjoined(
        engine: flow_engine.BaseFlowRunEngine[Any, Any], join_on_exit: bool = True
    ) -> Iterator[None]:
        with send_heartbeats(engine, join_on_exit=False):
            yield

    flow_engine._send_heartbeats = unjoined
    try:
        yield
    finally:
        flow_engine._send_heartbeats = send_heartbeats


class _SkipTeardown:
    """Ends a command-line process right after its exit handlers, skipping module teardown.

    Registered before anything else, it is the last exit handler to run: by then
    threads are joined and every other handler has run (Prefect's drain its
    queued logs and events in both). Tearing down the ~3,000 modules a flow run
    imports then takes 1-2 s on this project's machine (benchmarks/RESULTS.md),
    as long as the training itself, and does nothing a finished run needs.
    """

    def __init__(self) -> None:
        self.status: int | None = None  # None: a normal exit, with teardown

    def __call__(self) -> None:
        if self.status is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(self.status)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line on standard error and a non-zero status for any expected failure."""
    skip_teardown = _SkipTeardown()
    if argv is None:  # the process's own command line, not a call from Python
        atexit.register(skip_teardown)
    command = typer.main.get_command(app)
    try:
        status = command.main(args=argv, prog_name="lrflow", standalone_mode=False)
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
    except OSError as error:  # disk full, permissions, ...: the environment, not a bug
        where = f"{error.filename}: " if error.filename else ""
        _fail(one_line(f"{where}{error.strerror or error}"), EXIT_RUN_FAILED)
    except Exception as error:
        # Usage errors (click's, vendored by newer typer) carry their own message.
        format_message = getattr(error, "format_message", None)
        if callable(format_message):
            _fail(format_message(), EXIT_BAD_INPUT)
        raise
    # Without standalone mode, a typer.Exit's status comes back as the return value.
    skip_teardown.status = status if isinstance(status, int) else 0
    if skip_teardown.status != 0:
        sys.exit(skip_teardown.status)


def _fail(message: str, status: int) -> None:
    print(f"lrflow: error: {message}", file=sys.stderr)
    sys.exit(status)


if __name__ == "__main__":
    main()
