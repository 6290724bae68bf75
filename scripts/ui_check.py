"""Screenshot check: train against a real Prefect server and look at the artifacts in Chromium.

    python scripts/ui_check.py [--out docs] [--chromium chromium]

Starts `prefect server start` (SQLite in a temporary home, 127.0.0.1, a free
port), runs `lrflow train` on data/sample.parquet against it, then saves two
screenshots taken by headless Chromium (Debian's `chromium` package):

- ``ui-flow-run-artifacts.png``: the flow run's Artifacts tab;
- ``ui-cost-curve.png``: the run's ``train-cost-curve`` artifact page.

It fails (exit 1) unless the cost curve's line colour covers a wide stretch of
the second screenshot, i.e. the picture really rendered in the UI.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.artifacts import COST_CURVE_COLOR, COST_CURVE_KEY  # noqa: E402

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
# The curve is drawn 2 px wide in COST_CURVE_COLOR; antialiasing blends its edges,
# so a pixel within this many levels per channel counts as the line.
COLOR_TOLERANCE = 12
MIN_CURVE_PIXELS = 400
MIN_CURVE_WIDTH_PX = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def wait_healthy(api_url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if api(api_url, "/health") is True:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"ui-check: the Prefect server at {api_url} did not start in {seconds:.0f} s")


def screenshot(chromium: str, url: str, path: Path, size: str, profile: Path) -> None:
    subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={size}",
            # The UI fetches its data after load; give it virtual time to settle.
            "--virtual-time-budget=20000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def curve_pixels(png: Path) -> tuple[int, int]:
    """How many pixels have the curve's colour, and the width of their bounding box."""
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    image = imread(png)[..., :3]  # (height, width, 3) floats in [0, 1]
    target = np.array(to_rgb(COST_CURVE_COLOR))
    close = np.all(np.abs(image - target) <= COLOR_TOLERANCE / 255, axis=-1)
    columns = np.flatnonzero(close.any(axis=0))
    width = int(columns[-1] - columns[0] + 1) if columns.size else 0
    return int(close.sum()), width


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    if shutil.which(args.chromium) is None:
        print("ui-check: chromium not found (apt-get install -y chromium)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    work = Path(tempfile.mkdtemp(prefix="lrflow-ui-check-"))
    env = {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_URL": api_url,
    }
    server = subprocess.Popen(
        [bin_dir / "prefect", "server", "start"],
        env=env,
        stdout=(work / "server.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(api_url, 90)
        subprocess.run(
            [bin_dir / "lrflow", "train", "--data", ROOT / "data" / "sample.parquet",
             "--output", work / "out"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        runs = api(api_url, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
        run_id = runs[0]["id"]
        artifacts = api(
            api_url,
            "/artifacts/filter",
            {
                "flow_runs": {"id": {"any_": [run_id]}},
                "artifacts": {"key": {"any_": [COST_CURVE_KEY]}},
            },
        )
        if not artifacts:
            print(f"ui-check: run {run_id} has no {COST_CURVE_KEY} artifact", file=sys.stderr)
            return 1
        ui = f"http://127.0.0.1:{port}/v2"
        shots = {
            "ui-flow-run-artifacts.png": (
                f"{ui}/runs/flow-run/{run_id}?tab=Artifacts",
                "1400,1500",
            ),
            "ui-cost-curve.png": (f"{ui}/artifacts/artifact/{artifacts[0]['id']}", "1400,900"),
        }
        for index, (name, (url, size)) in enumerate(shots.items()):
            screenshot(args.chromium, url, args.out / name, size, work / f"chromium-{index}")
            print(f"ui-check: {url}\n          -> {args.out / name}")
        pixels, width = curve_pixels(args.out / "ui-cost-curve.png")
        print(f"ui-check: cost-curve colour: {pixels} px over {width} px of width")
        if pixels < MIN_CURVE_PIXELS or width < MIN_CURVE_WIDTH_PX:
            print("ui-check: FAIL: the cost curve is not visible in the UI", file=sys.stderr)
            return 1
        print("ui-check: OK: the cost curve renders in the Prefect UI")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
