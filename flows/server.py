"""Which Prefect server a command talks to: a configured one, a kept local one, or a temporary one.

``lrflow server start`` starts ``prefect server start`` in the background and
records its address and process in ``PREFECT_HOME/lrflow-server.json``; later
``lrflow train``/``score``/``serve`` runs find it there and use it, which saves
the several seconds a temporary server takes to start in every run. This
module imports no Prefect until a temporary server must be started: the
common case (a server is running) costs a file read and one HTTP request.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from flows.errors import LrflowError
from flows.locks import exclusive_lock

STATE_FILE = "lrflow-server.json"
LOG_FILE = "lrflow-server.log"
START_LOCK = ".lrflow-server-start.lock"
DEFAULT_PORT = 4200
# A server that answers its health check within this is taken as running.
HEALTH_TIMEOUT_S = 2.0
HINT = (
    "lrflow: no Prefect server is running; starting a temporary one for this run "
    "(seconds). `lrflow server start` keeps one running for later runs."
)


class ServerError(LrflowError):
    """The local server could not be started or stopped."""


@dataclass(frozen=True)
class ServerState:
    """What ``lrflow server start`` records about the server it started."""

    url: str  # the API's address, e.g. http://127.0.0.1:4200/api
    pid: int  # the `prefect server start` process, leader of its own process group
    log: str  # its standard output and error
    started_at: float  # seconds since the epoch


def prefect_home() -> Path:
    """``PREFECT_HOME`` as Prefect resolves it (an environment setting), without importing it."""
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def state_path(home: Path | None = None) -> Path:
    return (home or prefect_home()) / STATE_FILE


def read_state(home: Path | None = None) -> ServerState | None:
    """The recorded server, or None if none was recorded (or the record is unreadable)."""
    try:
        return ServerState(**json.loads(state_path(home).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def healthy(url: str, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """Whether a Prefect API answers ``GET {url}/health`` with success."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie, not yet reaped, has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    try:
        # /proc/PID/stat: "PID (command) STATE ..."; Z is a zombie. Linux only.
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def running_server(home: Path | None = None) -> ServerState | None:
    """The recorded server if its process is alive and its API answers; else None."""
    state = read_state(home)
    if state is None or not process_alive(state.pid) or not healthy(state.url):
        return None
    return state


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_server(
    host: str = "127.0.0.1", port: int | None = None, timeout_s: float = 120.0
) -> tuple[ServerState, bool]:
    """Start a Prefect server in the background, or find the one already recorded.

    Returns the server and whether this call started it. ``port`` None takes
    4200 when it is free, else any free port; 0 takes any free port. The
    server keeps its database in ``PREFECT_HOME`` (as a temporary server does), logs to
    ``PREFECT_HOME/lrflow-server.log``, and runs in its own session, so it
    outlives this process and a Ctrl-C in the terminal that started it.
    """
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    # The same lock as a temporary server's start: one migration of the database
    # at a time, and two `lrflow server start` at once start one server.
    with exclusive_lock(home / START_LOCK):
        state = running_server(home)
        if state is not None:
            return state, False
        if port is None:
            port = DEFAULT_PORT if _port_free(host, DEFAULT_PORT) else _free_port(host)
        elif port == 0:
            port = _free_port(host)
        elif not _port_free(host, port):
            raise ServerError(f"port {port} on {host} is in use; choose another with --port")
        log = home / LOG_FILE
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with open(log, "ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start",
                 "--host", host, "--port", str(port)],
                env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        url = f"http://{host}:{port}/api"
        deadline = time.monotonic() + timeout_s
        while not healthy(url, timeout=1.0):
            if process.poll() is not None:
                raise ServerError(
                    f"the Prefect server exited with status {process.returncode} while "
                    f"starting; see {log}"
                )
            if time.monotonic() > deadline:
                _stop_group(process.pid)
                raise ServerError(
                    f"the Prefect server did not answer within {timeout_s:g} s; see {log}"
                )
            time.sleep(0.25)
        state = ServerState(url=url, pid=process.pid, log=str(log), started_at=time.time())
        path = state_path(home)
        staged = path.with_name(f".{path.name}.{os.getpid()}")
        staged.write_text(json.dumps(asdict(state)))
        os.replace(staged, path)  # readers see the old record or the new one, whole
        return state, True


def _stop_group(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM the process group led by ``pid`` (the server and its web workers), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                # Reaps the child when this process started it; else fails, and
                # the liveness check below decides.
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            if not process_alive(pid):
                return
            time.sleep(0.1)


def _runs_prefect_server(pid: int) -> bool:
    """Whether process ``pid`` is a `prefect server start` (not a later process given its id)."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # no /proc (not Linux): trust the record
        return True
    return b"prefect" in arguments and b"server" in arguments and b"start" in arguments


def stop_server() -> ServerState | None:
    """Stop the recorded server and forget it; returns it, or None if none was recorded."""
    home = prefect_home()
    state = read_state(home)
    if state is None:
        return None
    # A record can outlive its server (a reboot, a kill -9) and its id be reused:
    # signal the process group only if it still is the server.
    if process_alive(state.pid) and _runs_prefect_server(state.pid):
        _stop_group(state.pid)
    state_path(home).unlink(missing_ok=True)
    return state


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment or the active Prefect profile, if set.

    Read without importing Prefect (seconds): the environment, then the
    profiles file (``PREFECT_PROFILES_PATH``, default
    ``PREFECT_HOME/profiles.toml``, where ``prefect config set`` writes) and its
    profile named by ``PREFECT_PROFILE`` or its ``active`` key.
    """
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or prefect_home() / "profiles.toml")
    try:
        import tomllib  # Python 3.11+

        document = tomllib.loads(path.expanduser().read_text())
    except (ImportError, OSError, ValueError):
        return None
    name = os.environ.get("PREFECT_PROFILE") or document.get("active")
    profile = document.get("profiles", {}).get(name, {}) if name else {}
    value = profile.get("PREFECT_API_URL") if isinstance(profile, dict) else None
    return str(value) if value else None


def use_running_server() -> str | None:
    """Point this process at the recorded server unless an API URL is set; returns the URL used.

    It must run before Prefect is imported: Prefect reads its settings then, so
    the recorded server's address goes into this process's environment.
    """
    configured = configured_api_url()
    if configured:
        return configured
    state = running_server()
    if state is None:
        return None
    os.environ["PREFECT_API_URL"] = state.url
    return state.url


def connect(hint: bool = True) -> None:
    """Make sure this process has a Prefect API before a flow runs.

    In order: ``PREFECT_API_URL`` (the environment or a Prefect profile), the
    server ``lrflow server start`` left running, else a temporary server for
    this process (with a one-line ``hint`` on standard error).
    """
    if use_running_server() is not None:
        return
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    if hint:
        print(HINT, file=sys.stderr)
    start_temporary_server()


def start_temporary_server() -> None:
    """Start this process's ephemeral Prefect server, one process at a time per Prefect home.

    Several ``lrflow train`` processes sharing a ``PREFECT_HOME`` each start a
    server on the same SQLite database. Started together they race through the
    database migrations (``duplicate column name``) and, on a small machine, time
    out waiting for each other's CPU. Started one after the other each finds the
    schema ready and starts in seconds; the flows then run concurrently (SQLite
    in WAL mode with a busy timeout).
    """
    # Only now: importing the server (FastAPI, SQLAlchemy, ...) takes ~3 s.
    from prefect.server.api.server import SubprocessASGIServer

    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(home / START_LOCK):
        SubprocessASGIServer().start()
