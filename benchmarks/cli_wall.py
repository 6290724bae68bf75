"""The command line's wall time: `lrflow train` with and without a running server, against a script.

    python benchmarks/cli_wall.py [--repeats 5] [--data data/sample.parquet]

Every command runs as a fresh process, as a user or a schedule pays it. Each
round runs, in turn:

- the script: read the file with Polars, standardize, fit scikit-learn's
  ``LogisticRegression`` (what a user could write instead of the pipeline);
- ``lrflow train`` with a kept server (``lrflow server start`` beforehand, its
  own ``PREFECT_HOME``; no ``PREFECT_API_URL``: the run finds it);
- an empty Prefect flow against the same server (Prefect's own floor);
- ``lrflow train`` without a server (another ``PREFECT_HOME``): a temporary
  server per run;
- ``lrflow --help`` and ``lrflow server status`` (how fast the CLI answers);
- with ``--baseline DIR``, another checkout's ``lrflow train`` (given the kept
  server's address) and ``lrflow --help``: before and after a change, paired.

The table quotes medians and, against the script, the median of the per-round
ratios. A last section takes one more run with a kept server apart: imports
(``python -X importtime``) and the phases and tasks from the run's log lines.
"""

import argparse
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
SCRIPT = """
import sys
import polars as pl
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

frame = pl.scan_parquet(sys.argv[1]).collect()
X = frame.select(pl.selectors.numeric()).to_numpy()
y = frame["label"].to_numpy()
model = LogisticRegression().fit(StandardScaler().fit_transform(X), y)
print(model.coef_, model.intercept_)
"""
EMPTY_FLOW = (
    "from prefect import flow\n@flow(name='empty')\ndef empty():\n    return None\nempty()\n"
)
# The sample's string key: the script leaves it out by selecting numeric columns.
EXCLUDE = ("--exclude", "id")
LOG_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d\d\d) \| \w+ +\| (.*)$")


def lrflow(*args: str) -> list[str]:
    return [PYTHON, "-m", "flows.cli", *args]


def timed(command: list[str], env: dict[str, str], check: bool = True) -> float:
    """Seconds of one run, in the checkout that ``env``'s PYTHONPATH names.

    ``python -m`` puts the working directory first on the module path, so it
    must be that checkout for the baseline's code to be the one that runs.
    """
    start = time.perf_counter()
    cwd = env.get("PYTHONPATH", str(ROOT))
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def machine() -> str:
    import polars
    import prefect
    import sklearn

    return (
        f"- date: {datetime.date.today().isoformat()}; {platform.processor() or platform.machine()}"
        f", {os.cpu_count()} logical cores; Python {platform.python_version()}, Prefect "
        f"{prefect.__version__}, Polars {polars.__version__}, scikit-learn {sklearn.__version__}"
        f"\n- load average at the start: {os.getloadavg()[0]:.2f} (1 min; the machine is shared)"
    )


def breakdown(env: dict[str, str], data: str, out: Path) -> list[str]:
    """One run with a kept server taken apart: imports, then phases and tasks from its log."""
    command = [PYTHON, "-X", "importtime", "-m", "flows.cli", "train", "--data", data, *EXCLUDE]
    wall_start = datetime.datetime.now()
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "--output", str(out)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    top: dict[str, float] = {}
    events: list[tuple[float, str]] = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|")
            if cumulative.strip().isdigit() and not name.startswith("  "):  # top level
                top[name.strip()] = int(cumulative) / 1e6
        elif match := LOG_LINE.match(line):
            at = datetime.datetime.combine(
                wall_start.date(), datetime.time.fromisoformat(match.group(1))
            )
            events.append(((at - wall_start).total_seconds(), match.group(2)))
    lines = [
        f"One `lrflow train` with a kept server, under `-X importtime` ({wall:.2f} s wall; "
        "importtime adds a little):",
        "",
        "| phase | s |",
        "|---|---:|",
        f"| imports, all (sum of the top-level modules' cumulative times) | "
        f"{sum(top.values()):.2f} |",
    ]
    for name, seconds in sorted(top.items(), key=lambda item: -item[1])[:8]:
        lines.append(f"| - import {name} | {seconds:.2f} |")
    begin = next((t for t, text in events if "Beginning flow run" in text), None)
    finished = [t for t, text in events if "Flow run" in text and "Finished in state" in text]
    if begin is not None and finished:
        lines.append(f"| process start to 'Beginning flow run' | {begin:.2f} |")
        previous = begin
        for t, text in events:
            task = re.match(r"Task run '(.+)-\w+' - Finished", text)
            if task:
                lines.append(
                    f"| - task {task.group(1)} (since the previous one) | {t - previous:.2f} |"
                )
                previous = t
        lines.append(f"| - after the last task to the flow's end | {finished[-1] - previous:.2f} |")
        lines.append(f"| flow: 'Beginning' to 'Finished' | {finished[-1] - begin:.2f} |")
        lines.append(f"| the flow's end to the process's exit | {wall - finished[-1]:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", default=str(ROOT / "data" / "sample.parquet"))
    parser.add_argument(
        "--baseline",
        help="another checkout of lrflow (e.g. before a change): its `lrflow train` joins the "
        "rounds, on the same kept server (given as PREFECT_API_URL)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lrflow-cli-wall-"))
    script = work / "script.py"
    script.write_text(SCRIPT)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    base |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT)}
    kept = base | {"PREFECT_HOME": str(work / "kept")}
    temporary = base | {"PREFECT_HOME": str(work / "temporary")}
    print(machine(), flush=True)
    start = time.perf_counter()
    timed(lrflow("server", "start", "--port", "0"), kept)
    print(f"- `lrflow server start`: {time.perf_counter() - start:.1f} s", flush=True)
    from flows.server import read_state

    state = read_state(Path(kept["PREFECT_HOME"]))
    assert state is not None
    # A plain Prefect script knows nothing of lrflow's record: it is given the address.
    kept_api = kept | {"PREFECT_API_URL": state.url}
    train = ("train", "--data", args.data, *EXCLUDE, "--output")
    commands = {
        "Polars + scikit-learn script": ([PYTHON, str(script), args.data], base),
        "lrflow train, kept server": (lrflow(*train, str(work / "out-kept")), kept),
        "empty Prefect flow, kept server": ([PYTHON, "-c", EMPTY_FLOW], kept_api),
        "lrflow train, no server (temporary one)": (
            lrflow(*train, str(work / "out-temporary")),
            temporary,
        ),
        **(
            {
                f"baseline ({args.baseline}) lrflow train, kept server": (
                    lrflow(*train, str(work / "out-baseline")),
                    kept_api | {"PYTHONPATH": args.baseline},
                ),
                f"baseline ({args.baseline}) lrflow --help": (
                    lrflow("--help"),
                    base | {"PYTHONPATH": args.baseline},
                ),
            }
            if args.baseline
            else {}
        ),
        "lrflow --help": (lrflow("--help"), base),
        "lrflow server status": (lrflow("server", "status"), kept),
    }
    try:
        for command, env in commands.values():  # warm-up: page cache, database migrations
            timed(command, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, (command, env) in commands.items():
                times[name].append(timed(command, env))
        out = work / "out-breakdown"
        details = breakdown(kept, args.data, out)
    finally:
        timed(lrflow("server", "stop"), kept, check=False)
        shutil.rmtree(work, ignore_errors=True)
    script_times = times["Polars + scikit-learn script"]
    if args.baseline:  # this checkout against the baseline, paired by round
        for what in ("lrflow train, kept server", "lrflow --help"):
            ours, theirs = times[what], times[f"baseline ({args.baseline}) {what}"]
            ratio = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
            saved = statistics.median(b - a for a, b in zip(ours, theirs, strict=True))
            print(f"- {what}: this checkout / the baseline, pairwise median {ratio:.2f}x "
                  f"({saved:+.2f} s saved)")  # fmt: skip
    print(
        f"\n{args.repeats} interleaved rounds, fresh process each\n\n"
        "| command | median s | min s | max s | vs the script: pairwise median |\n"
        "|---|---:|---:|---:|---:|"
    )
    for name, values in times.items():
        ratio = statistics.median(v / s for v, s in zip(values, script_times, strict=True))
        print(
            f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | "
            f"{max(values):.2f} | {ratio:.2f}x |"
        )
    print("\n" + "\n".join(details))
    print(f"\n- load average at the end: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    main()
