"""What a train run shows in the Prefect UI: plain functions build it, thin calls publish it.

Every artifact has a fixed lowercase-dash key, so the UI groups the versions of
one artifact across runs (Artifacts page -> key -> history).

Pictures: Prefect's image artifact takes only a URL, and the UI prints that URL
under the image (a base64 ``data:`` URI is tens of kilobytes of text). A
markdown artifact whose image is a ``data:`` URI renders the same picture
cleanly in both the V1 and the V2 UI, needs no file server, and survives the
output directory being moved, so the cost curve is published that way
(checked in headless Chromium by ``scripts/ui_check.py``).
"""

import base64
import contextvars
import io
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import PurePath
from typing import Any
from uuid import UUID

import numpy as np
import pyarrow as pa

from flows import arrow, storage
from flows.config import TrainConfig

PROGRESS_KEY = "train-progress"
PARAMETERS_KEY = "train-parameters"
REPORT_KEY = "train-report"
COST_CURVE_KEY = "train-cost-curve"
HISTORY_KEY = "train-history"
HISTORY_ROWS = 20
OUTPUT_LINK_KEY_PREFIX = "train-output-"
COST_CURVE_FILE = "cost_history.png"

# The line colour of the cost curve; the UI check looks for these pixels.
COST_CURVE_COLOR = "#1f77b4"

# (iteration, total iterations, cost) -> None: a local listener of training progress
# (the CLI's progress bar). Called at most every LISTENER_SECONDS.
ProgressListener = Callable[[int, int, float], None]
progress_listener: contextvars.ContextVar[ProgressListener | None] = contextvars.ContextVar(
    "lrflow_progress_listener", default=None
)
LISTENER_SECONDS = 0.1


# --- plain functions: the content -----------------------------------------------------------


class ProgressThrottle:
    """Which iterations of a training loop are worth a progress update.

    An update is an HTTP call to the Prefect API (milliseconds), an iteration of a
    small problem takes microseconds: so an update is due only when the progress
    has crossed the next of ``steps`` equal milestones *and* ``min_seconds`` have
    passed since the last one. A long run gets ``steps`` updates; a run that
    finishes in a second gets one or two and pays nothing for the rest.
    """

    def __init__(
        self,
        total: int,
        *,
        steps: int = 20,
        min_seconds: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total < 1 or steps < 1:
            raise ValueError(f"total and steps must be >= 1, got {total} and {steps}")
        self.total = total
        self.steps = steps
        self.min_seconds = min_seconds
        self._clock = clock
        self._last_time = clock()
        self._next_step = 1

    def percent(self, iteration: int) -> float:
        return 100.0 * min(iteration, self.total) / self.total

    def due(self, iteration: int) -> bool:
        """True when ``iteration`` (1-based) should be reported; advances the milestones."""
        step = math.floor(self.steps * min(iteration, self.total) / self.total)
        if step < self._next_step:
            return False
        now = self._clock()
        if now - self._last_time < self.min_seconds:
            return False
        self._last_time = now
        self._next_step = step + 1
        return True


def cost_curve_png(
    cost_history: Sequence[float] | np.ndarray,
    gradient_norm: Sequence[float] | np.ndarray | None = None,
    validation_cost: Sequence[float] | np.ndarray | None = None,
    tol: float | None = None,
) -> bytes:
    """How far each iteration is from the end, on a log axis, and the validation cost beside.

    Left: ``J - J_final`` (and ``max |∇J|``, the stop rule's number) against the
    iteration on a log axis, so a run stopped at the cap, whose gap still falls
    steadily, does not look finished. Right: the cost ``J`` and the validation
    cost where it was evaluated. Matplotlib's Agg canvas, no pyplot state.

    Parameters
    ----------
    cost_history : array-like of shape (n_iterations + 1,)
        ``cost_history[i]`` is the cost before update ``i + 1``.
    gradient_norm : array-like of shape (n_iterations + 1,), optional
    validation_cost : array-like of shape (n_iterations + 1,), optional, NaN where not evaluated
    tol : float, optional
        The stop rule's tolerance, drawn as a dashed line: the gradient ends below it
        exactly when the run converged (``J - J_final`` always falls to 0 at the end).
    """
    # Imported here: matplotlib takes about half a second to import, which only
    # the runs that draw should pay.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    cost = np.asarray(cost_history, dtype=np.float64)
    iteration = np.arange(cost.size)
    figure = Figure(figsize=(9.0, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    gap_axes, cost_axes = figure.subplots(1, 2)
    gap = cost - cost[-1]
    shown = gap > 0  # the last point (and any below the end) has no logarithm
    gap_axes.plot(iteration[shown], gap[shown], color=COST_CURVE_COLOR, linewidth=2,
                  label="J - J_final")  # fmt: skip
    if gradient_norm is not None:
        gradient = np.asarray(gradient_norm, dtype=np.float64)
        gap_axes.plot(iteration, gradient, color="#d62728", linewidth=1, label="max |∇J|")
    title = "J - J_final (log)"
    if gradient_norm is not None and tol is not None and tol > 0:
        gap_axes.axhline(tol, color="#d62728", linestyle="--", linewidth=1, label="tol")
        done = float(gradient[-1]) <= tol
        title = "converged" if done else f"NOT converged: max |∇J| {gradient[-1]:.2g} > tol"
    if shown.any() or gradient_norm is not None:
        gap_axes.set_yscale("log")
        # "1e-08", not matplotlib's default 10⁻⁸: that one is typeset as TeX math,
        # a third of the time the whole picture takes.
        gap_axes.yaxis.set_major_formatter(LogFormatter())
    gap_axes.set_xlabel("iteration")
    gap_axes.set_title(title)
    gap_axes.legend(loc="upper right", fontsize="small")
    gap_axes.grid(alpha=0.3)
    cost_axes.plot(iteration, cost, color="#7f7f7f", linewidth=1.5, label="cost J (train)")
    if validation_cost is not None:
        held_out = np.asarray(validation_cost, dtype=np.float64)
        evaluated = ~np.isnan(held_out)
        cost_axes.plot(iteration[evaluated], held_out[evaluated], color="#ff7f0e",
                       marker=".", linewidth=1.5, label="validation log-loss")  # fmt: skip
    cost_axes.set_xlabel("iteration")
    cost_axes.set_title(f"cost: {cost[0]:.6g} -> {cost[-1]:.6g} in {cost.size - 1} iterations")
    cost_axes.legend(loc="upper right", fontsize="small")
    cost_axes.grid(alpha=0.3)
    # Fixed margins: tight_layout measures every label's extent first, which
    # takes longer than drawing the picture.
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.91, wspace=0.22)
    buffer = io.BytesIO()
    # No "Software"/date chunks: the same history gives the same bytes.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def cost_curve_markdown(png: bytes, *, n_iterations: int, final_cost: float) -> str:
    """A markdown page that is the picture (inlined as a data: URI) and one line under it."""
    return (
        "# Cost curve\n\n"
        f"![cost against iteration]({png_data_uri(png)})\n\n"
        f"{n_iterations} iterations, final cost {final_cost:.6g}.\n"
    )


def history_rows(history: pa.Table, last: int = HISTORY_ROWS) -> list[dict[str, Any]]:
    """The last ``last`` rows of a store's ``runs.parquet``, newest first, for reading."""
    rows = arrow.rows(history.slice(max(0, history.num_rows - last)))[::-1]
    for row in rows:
        for key in ("started_at", "finished_at"):
            row[key] = row[key].isoformat(timespec="seconds")
        if row["validation_log_loss"] is not None:
            row["validation_log_loss"] = round(row["validation_log_loss"], 6)
    return rows


def history_png(history: pa.Table) -> bytes:
    """The validation log-loss of each run in ``runs.parquet``, promoted runs filled.

    Runs without validation rows have no point. The x axis is the run's position
    in the history (oldest first).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    loss = np.array(
        [np.nan if v is None else v for v in history.column("validation_log_loss").to_pylist()],
        dtype=np.float64,
    )
    promoted = np.array(history.column("promoted").to_pylist(), dtype=bool)
    position = np.arange(loss.size)
    figure = Figure(figsize=(7.0, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(position, loss, color=COST_CURVE_COLOR, linewidth=1, alpha=0.5)
    axes.scatter(position[promoted], loss[promoted], color=COST_CURVE_COLOR, label="promoted")
    axes.scatter(
        position[~promoted], loss[~promoted], facecolors="none", edgecolors=COST_CURVE_COLOR,
        label="not promoted",
    )  # fmt: skip
    axes.set_xlabel("run (oldest first)")
    axes.set_ylabel("validation log-loss")
    axes.set_title(f"validation log-loss over {loss.size} runs")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.subplots_adjust(left=0.12, right=0.97, bottom=0.14, top=0.91)  # as cost_curve_png
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def history_markdown(history: pa.Table, last: int = HISTORY_ROWS) -> str:
    """The store's history: the last runs as a table, and the log-loss over runs as a picture."""
    rows = history_rows(history, last)
    header = list(history.schema.names)
    return (
        f"# Model store history (last {len(rows)} of {history.num_rows} runs)\n\n"
        + _table(header, [[row[name] for name in header] for row in rows])
        + f"\n\n![validation log-loss over runs]({png_data_uri(history_png(history))})\n"
    )


def parameter_rows(params_path: PurePath) -> list[dict[str, Any]]:
    """The rows of a written ``params.parquet``: term, estimate and its Wald statistics."""
    fs, where = storage.filesystem(params_path)
    return arrow.read_parquet(where, filesystem=fs).to_pylist()


def metric_rows(metrics_path: PurePath) -> list[dict[str, Any]]:
    """The rows of a written ``metrics.parquet``: ``{"split", "metric", "value"}``."""
    fs, where = storage.filesystem(metrics_path)
    columns = ["split", "metric", "value"]
    return arrow.read_parquet(where, filesystem=fs, columns=columns).to_pylist()


def output_link_key(path: PurePath) -> str:
    """``params.parquet`` -> ``train-output-params-parquet`` (lowercase letters, digits, dashes)."""
    stem = "".join(c if c.isalnum() else "-" for c in path.name.lower())
    return OUTPUT_LINK_KEY_PREFIX + "-".join(part for part in stem.split("-") if part)


def _cell(value: object) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(
    *,
    config: TrainConfig,
    files: Sequence[PurePath],
    n_examples: int,
    features: Sequence[str],
    n_iterations: int,
    stop_reason: str,
    final_cost: float,
    n_validation: int = 0,
    metrics: Sequence[Mapping[str, Any]],
    seconds: float,
    outputs: Sequence[PurePath],
    columns: Sequence[Sequence[str]] = (),
    notes: Sequence[str] = (),
    promotion: Sequence[tuple[str, object]] = (),
    diagnostics: Sequence[str] = (),
    gradient_max: float | None = None,
) -> str:
    """The run's report: data, columns, config, how training went, metrics, promotion, outputs.

    ``columns`` are ``(column, role, detail)`` rows (every column used or left out,
    and why); ``notes`` are warnings to read before trusting the model;
    ``diagnostics`` the fit's (not converged, aliased terms, separation).
    """
    config_rows = [(name, value) for name, value in config.model_dump(mode="json").items()]
    sections = [
        "# Training report",
        "## Data",
        _table(
            ["", ""],
            [
                ("files", len(files)),
                ("training rows", n_examples),
                ("validation rows", n_validation),
                ("features", f"{len(features)}: {', '.join(features)}"),
            ],
        ),
        "\n".join(f"- `{path}`" for path in files),
        "## Columns",
        _table(["column", "role", "detail"], columns),
        *(["## Warnings", "\n".join(f"- {note}" for note in notes)] if notes else []),
        "## Training",
        _table(
            ["", ""],
            [
                ("iterations run", n_iterations),
                ("stop reason", stop_reason),
                *([("max |gradient|", float(gradient_max))] if gradient_max is not None else []),
                ("final cost", float(final_cost)),
                ("wall time (s)", round(float(seconds), 3)),
            ],
        ),
        *(
            ["## Diagnostics", "\n".join(f"- {line}" for line in diagnostics)]
            if diagnostics
            else []
        ),
        "## Metrics",
        _table(
            ["split", "metric", "value"], [(r["split"], r["metric"], r["value"]) for r in metrics]
        ),
        *(["## Promotion", _table(["", ""], promotion)] if promotion else []),
        "## Config",
        _table(["parameter", "value"], config_rows),
        "## Outputs",
        "\n".join(f"- `{path}`" for path in outputs),
    ]
    return "\n\n".join(sections) + "\n"


# --- thin Prefect calls: publishing ---------------------------------------------------------


@contextmanager
def training_progress(total: int) -> Iterator[Callable[[int, float], None]]:
    """A ``fit(..., callback=...)`` that publishes the ``train-progress`` artifact.

    The artifact is created at 0 % and set to 100 % when training ends normally;
    in between, :class:`ProgressThrottle` picks the updates. A local listener
    (``progress_listener``) is told at most every ``LISTENER_SECONDS``.
    """
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    artifact_id = create_progress_artifact(
        0.0, key=PROGRESS_KEY, description=f"Gradient-descent updates done, of at most {total}."
    )
    assert isinstance(artifact_id, UUID)  # called from sync code: not a coroutine
    throttle = ProgressThrottle(total)
    listener = progress_listener.get()
    listener_due = 0.0

    def on_update(iteration: int, cost: float) -> None:
        nonlocal listener_due
        if throttle.due(iteration):
            update_progress_artifact(artifact_id, throttle.percent(iteration))
        if listener is not None:
            now = time.monotonic()
            if now >= listener_due:
                listener_due = now + LISTENER_SECONDS
                listener(iteration, total, cost)

    yield on_update
    update_progress_artifact(artifact_id, 100.0)
    if listener is not None:
        listener(total, total, math.nan)


def publish_run_artifacts(
    *,
    config: TrainConfig,
    files: Sequence[PurePath],
    n_examples: int,
    features: Sequence[str],
    cost_history: Sequence[float] | np.ndarray,
    n_iterations: int,
    stop_reason: str,
    seconds: float,
    outputs: Sequence[PurePath],
    n_validation: int = 0,
    columns: Sequence[Sequence[str]] = (),
    notes: Sequence[str] = (),
    promotion: Sequence[tuple[str, object]] = (),
    diagnostics: Sequence[str] = (),
    gradient_norm: Sequence[float] | np.ndarray | None = None,
) -> None:
    """Create the parameter table, the report, the cost curve and one link per output file."""
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    by_name = {path.name: path for path in outputs}
    final_cost = float(cost_history[-1])
    if "params.parquet" in by_name:
        create_table_artifact(
            parameter_rows(by_name["params.parquet"]),
            key=PARAMETERS_KEY,
            description="Estimates, standard errors, z, p and Wald intervals on the raw "
            "feature scale, as in params.parquet.",
        )
    metrics = metric_rows(by_name["metrics.parquet"]) if "metrics.parquet" in by_name else []
    create_markdown_artifact(
        report_markdown(
            config=config,
            files=files,
            n_examples=n_examples,
            n_validation=n_validation,
            features=features,
            n_iterations=n_iterations,
            stop_reason=stop_reason,
            final_cost=final_cost,
            metrics=metrics,
            seconds=seconds,
            outputs=outputs,
            columns=columns,
            notes=notes,
            promotion=promotion,
            diagnostics=diagnostics,
            gradient_max=None if gradient_norm is None else float(gradient_norm[-1]),
        ),
        key=REPORT_KEY,
        description=f"{n_iterations} iterations ({stop_reason}), final cost {final_cost:.6g}",
    )
    curve = by_name.get(COST_CURVE_FILE)
    if curve is not None:
        with storage.open_input(curve) as handle:
            png = handle.read()
    else:
        png = cost_curve_png(cost_history, gradient_norm)
    create_markdown_artifact(
        cost_curve_markdown(png, n_iterations=n_iterations, final_cost=final_cost),
        key=COST_CURVE_KEY,
        description="J - J_final and max |gradient| on a log axis, and the validation cost "
        "(also written as cost_history.png).",
    )
    for path in outputs:
        create_link_artifact(
            storage.uri(path),
            link_text=str(path),
            key=output_link_key(path),
            description=f"Output file {path.name}",
        )


def publish_history(history: pa.Table) -> None:
    """The ``train-history`` artifact: the store's last runs and their validation log-loss."""
    from prefect.artifacts import create_markdown_artifact

    last = arrow.rows(history.slice(history.num_rows - 1))[0] if history.num_rows else None
    create_markdown_artifact(
        history_markdown(history),
        key=HISTORY_KEY,
        description=f"runs.parquet: {history.num_rows} runs; the last: "
        + (f"{last['run']} ({last['reason']})" if last else "none"),
    )
