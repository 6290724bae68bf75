#!/usr/bin/env bash
# `make serve`: a local Prefect server (SQLite, 127.0.0.1 only), the process work
# pool, every deployment of prefect.yaml, and a worker. Ctrl-C stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
PORT="${LRFLOW_SERVER_PORT:-4200}"
POOL=lrflow-process
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.venv/prefect-home}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_SERVER_API_HOST=127.0.0.1
export PREFECT_SERVER_API_PORT="$PORT"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
mkdir -p "$PREFECT_HOME"

healthy() {
    "$BIN/python" -c "import sys, urllib.request
try: sys.exit(urllib.request.urlopen('$PREFECT_API_URL/health', timeout=2).status != 200)
except OSError: sys.exit(1)"
}
if healthy; then
    echo "lrflow: error: a server already answers on port $PORT; use it with" \
        "PREFECT_API_URL=$PREFECT_API_URL, or pick another port with LRFLOW_SERVER_PORT" >&2
    exit 2
fi

# Children get their own process groups (set -m), so Ctrl-C reaches only this
# script, which stops them in order: the worker first (it reports to the server
# on its way out), then the server.
set -m
started=()
stop() {
    trap - EXIT INT TERM
    local i pid
    for ((i = ${#started[@]} - 1; i >= 0; i--)); do
        pid=${started[i]}
        kill -INT "$pid" 2>/dev/null || continue
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    echo "stopped the worker and the server"
}
trap stop EXIT INT TERM

"$BIN/prefect" server start >"$PREFECT_HOME/server.log" 2>&1 &
started+=($!)
for _ in $(seq 90); do healthy && break; sleep 1; done
healthy || { echo "lrflow: error: the server did not start; see $PREFECT_HOME/server.log" >&2; exit 1; }

"$BIN/prefect" work-pool inspect "$POOL" >/dev/null 2>&1 \
    || "$BIN/prefect" work-pool create "$POOL" --type process >/dev/null
"$BIN/prefect" --no-prompt deploy --all >"$PREFECT_HOME/deploy.log" 2>&1 \
    || { cat "$PREFECT_HOME/deploy.log" >&2; exit 1; }
"$BIN/prefect" worker start --pool "$POOL" >"$PREFECT_HOME/worker.log" 2>&1 &
started+=($!)

cat <<MSG
Prefect UI:  http://127.0.0.1:$PORT   (API $PREFECT_API_URL, database in $PREFECT_HOME)
Deployed:    $("$BIN/prefect" deployment ls 2>/dev/null | grep -o 'train/[a-z0-9-]*' | sort -u | tr '\n' ' ')
Run one now, from another terminal:
    PREFECT_API_URL=$PREFECT_API_URL .venv/bin/prefect deployment run 'train/nightly' --watch
Logs: $PREFECT_HOME/{server,worker,deploy}.log.  Ctrl-C stops the worker and the server.
MSG
wait
