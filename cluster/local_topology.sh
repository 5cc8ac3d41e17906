#!/usr/bin/env bash
# The cluster topology of docs/cluster.md, stood up on this one machine, checked, and torn down:
#   - a Ray cluster of two nodes (a head and a worker, `ray start`, 2 logical CPUs each),
#   - PostgreSQL (Debian's package) with an MLflow tracking server on 127.0.0.1 backed by it,
#   - shared storage: one local folder for Ray Train checkpoints and MLflow artifacts,
# then the tiny 2-D profile of the DAG (`dvc repro`, every stage) runs against it in a copy of the
# repository, and the result is checked: every output, one MLflow run per variant on the server,
# and training spread over both nodes. Everything binds to 127.0.0.1 and is stopped on exit.
#
#   bash cluster/local_topology.sh            # from the repository root, after `make setup`
#   KEEP=1 bash cluster/local_topology.sh     # leave the work folder for inspection
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PY")"
WORK="$(mktemp -d /tmp/scorelab-cluster.XXXXXX)"
chmod 755 "$WORK"
SHARED="$WORK/shared"          # what every node would mount: checkpoints and MLflow artifacts
RAY_TMP="$WORK/ray"            # this cluster's own Ray folder: teardown stops only its processes
export RAY_AUTH_MODE=disabled  # loopback only; a real cluster shares the token instead
export DVC_NO_ANALYTICS=1
mkdir -p "$SHARED/ray" "$SHARED/mlartifacts" "$RAY_TMP"

say() { printf '[cluster] %s\n' "$*"; }
# as the postgres user, from a folder it can read (runuser keeps the caller's cwd, which it may not)
as_postgres() { (cd "$WORK/pgsock" && runuser -u postgres -- "$@"); }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

PG_PID="" MLFLOW_PID=""
teardown() {
  local rc=$?
  say "tearing down"
  [ -n "$MLFLOW_PID" ] && kill "$MLFLOW_PID" 2>/dev/null && wait "$MLFLOW_PID" 2>/dev/null || true
  # `ray stop` would stop every Ray of this user on the machine: stop only the processes of this cluster
  pkill -TERM -f "$RAY_TMP" 2>/dev/null || true
  sleep 2
  pkill -KILL -f "$RAY_TMP" 2>/dev/null || true
  if [ -n "$PG_PID" ]; then as_postgres "$PG_BIN/pg_ctl" -D "$WORK/pgdata" -m fast stop >/dev/null 2>&1 || true; fi
  if [ "${KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
  exit $rc
}
trap teardown EXIT

# --- PostgreSQL: Debian's package, a throw-away cluster owned by the postgres user ------------------
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
if [ -z "$PG_BIN" ] || ! id postgres >/dev/null 2>&1; then
  say "installing PostgreSQL (Debian package postgresql)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  PG_BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
fi
"$PY" -c "import psycopg2" 2>/dev/null || "$PY" -m pip install -q "psycopg2-binary==2.9.13"
PG_PORT="$(free_port)"
install -d -o postgres -g postgres "$WORK/pgdata" "$WORK/pgsock"
as_postgres "$PG_BIN/initdb" -D "$WORK/pgdata" -A trust -U postgres >/dev/null
as_postgres "$PG_BIN/pg_ctl" -D "$WORK/pgdata" -l "$WORK/pgdata/postgres.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $WORK/pgsock" start >/dev/null
PG_PID=1
as_postgres "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" mlflow
say "PostgreSQL on 127.0.0.1:$PG_PORT"

# --- MLflow tracking server on PostgreSQL, artifacts on the shared folder ---------------------------
ML_PORT="$(free_port)"
TRACKING="http://127.0.0.1:$ML_PORT"
"$BIN/mlflow" server --host 127.0.0.1 --port "$ML_PORT" --workers 1 \
  --backend-store-uri "postgresql+psycopg2://postgres@127.0.0.1:$PG_PORT/mlflow" \
  --artifacts-destination "$SHARED/mlartifacts" >"$WORK/mlflow.log" 2>&1 &
MLFLOW_PID=$!
for _ in $(seq 120); do
  curl -sf "$TRACKING/health" >/dev/null 2>&1 && break
  kill -0 "$MLFLOW_PID" 2>/dev/null || { tail -20 "$WORK/mlflow.log"; say "MLflow server exited"; exit 1; }
  sleep 1
done
curl -sf "$TRACKING/health" >/dev/null || { tail -20 "$WORK/mlflow.log"; say "MLflow server did not start"; exit 1; }
say "MLflow server at $TRACKING (backend PostgreSQL)"

# --- Ray: a head and a worker node ------------------------------------------------------------------
RAY_PORT="$(free_port)" DASH_PORT="$(free_port)"
# Every process of the cluster (and of the DAG's stages) is told which cluster and which dashboard
# API to use: Ray Train's placement-group cleaner asks the state API, and refuses to guess when other
# Ray instances run on the same machine.
export RAY_ADDRESS="127.0.0.1:$RAY_PORT" RAY_API_SERVER_ADDRESS="http://127.0.0.1:$DASH_PORT"
"$BIN/ray" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" --num-cpus 2 --temp-dir "$RAY_TMP" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --disable-usage-stats >"$WORK/ray-head.log" 2>&1
"$BIN/ray" start --address "$RAY_ADDRESS" --node-ip-address 127.0.0.1 --num-cpus 2 \
  --disable-usage-stats >"$WORK/ray-worker.log" 2>&1
NODES="$("$PY" -c "import ray; ray.init(address='$RAY_ADDRESS', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))" 2>/dev/null | tail -1)"
[ "$NODES" = 2 ] || { say "expected 2 Ray nodes, found $NODES"; exit 1; }
say "Ray cluster at $RAY_ADDRESS with $NODES nodes"

# --- the DAG against it -----------------------------------------------------------------------------
COPY="$WORK/repo"
mkdir -p "$COPY"
(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 -I{} cp --parents {} "$COPY/")
(cd "$COPY" && git init -q)
"$PY" "$REPO/cluster/tiny_profile.py" "$COPY/params.yaml" --ray-address "$RAY_ADDRESS" \
  --tracking-uri "$TRACKING" --storage-path "$SHARED/ray"
say "dvc repro of the tiny profile (log: $WORK/dvc.log)"
start=$(date +%s)
if ! (cd "$COPY" && PATH="$BIN:$PATH" "$BIN/dvc" repro >"$WORK/dvc.log" 2>&1); then
  tail -40 "$WORK/dvc.log"; say "dvc repro failed"; exit 1
fi
say "dvc repro finished in $(( $(date +%s) - start )) s"

# --- checks -----------------------------------------------------------------------------------------
"$PY" - "$COPY" "$TRACKING" "$SHARED" <<'EOF'
import json, sys
from pathlib import Path
from mlflow.tracking import MlflowClient

repo, uri, shared = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
for f in ["outputs/train/vp/model.pt", "outputs/train/ve/model.pt", "outputs/tune/best_params.yaml",
          "outputs/eval/vp/metrics.json", "outputs/eval/tuned/metrics.json", "reports/comparison.md"]:
    assert (repo / f).is_file(), f"missing output {f}"
client = MlflowClient(uri)
exp = client.get_experiment_by_name("scorelab-cluster-check")
assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:"), exp
runs = client.search_runs([exp.experiment_id])
names = sorted(r.info.run_name for r in runs)
assert names == sorted(["vp", "ve", "tune", "tune-trial000", "tune-trial001", "comparison"]), names
for r in runs:
    if r.info.run_name in ("vp", "ve"):
        assert r.data.tags.get("ray.num_nodes") == "2", (r.info.run_name, r.data.tags.get("ray.num_nodes"))
        assert "eval_sliced_w2_dpm_solver" in r.data.metrics or r.info.run_name == "ve"
assert any((shared / "ray").iterdir()), "no Ray Train checkpoints on the shared storage"
assert any((shared / "mlartifacts").rglob("model.pt")), "no model artifact on the shared artifact store"
print(f"[cluster] checks passed: {len(runs)} MLflow runs on the PostgreSQL-backed server, 2 Ray nodes, "
      "checkpoints and artifacts on the shared storage")
EOF
