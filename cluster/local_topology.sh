#!/usr/bin/env bash
# The cluster topology of docs/cluster.md, stood up on this one machine, checked, and torn down:
#   - a Ray cluster of two nodes, a head and a worker (`ray start`),
#   - PostgreSQL (Debian's package) with an MLflow tracking server on 127.0.0.1 backed by it,
#   - shared storage: one local folder for Ray Train checkpoints and MLflow artifacts,
# then the tiny 2-D profile of the DAG (`dvc repro`, every stage) runs against it in a copy of the
# repository, and the result is checked: every stage done, every output, one MLflow run per variant on
# the server, and where the work ran. Everything binds to 127.0.0.1 and is stopped on exit.
#
# TOPOLOGY=isolated (the default, what CI runs) catches head-only paths, as on the KubeRay manifest:
#   - the head has 0 CPUs, so every task, Train worker and Tune trial lands on the worker node (4 CPUs);
#   - the worker node runs in its own mount namespace (`unshare --mount`), where an empty read-only tmpfs
#     lies over the DAG's repository copy, and another over this checkout with only its image bound back
#     (the venv and the folder scorelab is imported from, as a container image would hold them). Its
#     processes see the shared storage folder and reach the MLflow server, nothing of the repository.
#     A probe task on each node proves this before the DAG runs.
# TOPOLOGY=shared: the former check, head and worker 2 CPUs each on one filesystem; training must span
#   both nodes.
#
#   bash cluster/local_topology.sh                      # from the repository root, after `make setup`; as root
#   TOPOLOGY=shared bash cluster/local_topology.sh      # both nodes on the same filesystem
#   KEEP=1 bash cluster/local_topology.sh               # leave the work folder for inspection
#   PY=/other/venv/bin/python PYTHONPATH=/other/src bash ...   # another interpreter or scorelab (every node)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PY")"
TOPOLOGY="${TOPOLOGY:-isolated}"
case "$TOPOLOGY" in
  isolated) HEAD_CPUS=0 WORKER_CPUS=4 ;;  # train: 2 workers x 1 CPU; tune: 2 trials x (1 worker + 0.01)
  shared) HEAD_CPUS=2 WORKER_CPUS=2 ;;
  *) echo "TOPOLOGY must be isolated or shared, not '$TOPOLOGY'" >&2; exit 2 ;;
esac
WORK="$(mktemp -d /tmp/scorelab-cluster.XXXXXX)"
chmod 755 "$WORK"
SHARED="$WORK/shared"          # what every node would mount: checkpoints and MLflow artifacts
RAY_TMP="$WORK/ray"            # this cluster's own Ray folder (the worker node's under it): teardown finds its processes by it
COPY="$WORK/repo"              # the DAG's copy of the repository: the head's (driver's) disk
export RAY_AUTH_MODE=disabled  # loopback only; a real cluster shares the token instead
export DVC_NO_ANALYTICS=1
mkdir -p "$SHARED/ray" "$SHARED/mlartifacts" "$RAY_TMP/worker" "$COPY"

say() { printf '[cluster] %s\n' "$*"; }
# as the postgres user, from a folder it can read (runuser keeps the caller's cwd, which it may not)
as_postgres() { (cd "$WORK/pgsock" && runuser -u postgres -- "$@"); }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# The processes whose command line or open files name $1. Ray's agents rename themselves
# ("ray::DashboardAgent") and the client server's command line has no folder, so a command-line match
# (pkill -f) misses them; their log files give them away.
pids_using() {
  local d
  for d in /proc/[0-9]*; do
    [ "${d#/proc/}" = "$$" ] && continue
    if grep -qzF -- "$1" "$d/cmdline" 2>/dev/null || ls -l "$d/fd" 2>/dev/null | grep -qF -- "$1"; then
      echo "${d#/proc/}"
    fi
  done
}
# SIGTERM, up to 10 s, then SIGKILL; fails if any survives. `ray stop` would stop every Ray of this user.
stop_using() {
  local pids _
  pids="$(pids_using "$1")"
  [ -z "$pids" ] && return 0
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 10); do
    sleep 1
    pids="$(pids_using "$1")"
    [ -z "$pids" ] && return 0
  done
  kill -KILL $pids 2>/dev/null || true
  sleep 1
  pids="$(pids_using "$1")"
  [ -z "$pids" ] || { say "still running after SIGKILL: $(echo $pids)"; return 1; }
}

PG_PID=""
teardown() {
  local rc=$?
  say "tearing down"
  stop_using "$WORK/mlflow.log" || rc=1    # the server and its workers, which inherit its log
  stop_using "$RAY_TMP" || rc=1            # both nodes, whatever namespace they run in
  if [ -n "$PG_PID" ]; then as_postgres "$PG_BIN/pg_ctl" -D "$WORK/pgdata" -m fast stop >/dev/null 2>&1 || true; fi
  if [ "${KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
  exit $rc
}
trap teardown EXIT

if [ "$TOPOLOGY" = isolated ] && ! unshare --mount --propagation private true 2>/dev/null; then
  say "TOPOLOGY=isolated needs unshare --mount (run as root, or TOPOLOGY=shared)"; exit 1
fi

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
RAY_PORT="$(free_port)" DASH_PORT="$(free_port)" CLIENT_PORT="$(free_port)"
# Every process of the cluster (and of the DAG's stages) is told which dashboard API to use (Ray Train's
# placement-group cleaner asks the state API, and refuses to guess when other Ray instances run on the
# same machine); the script's own drivers, which cluster (the stages take it from params instead).
export RAY_ADDRESS="127.0.0.1:$RAY_PORT" RAY_API_SERVER_ADDRESS="http://127.0.0.1:$DASH_PORT"
"$BIN/ray" start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" --num-cpus "$HEAD_CPUS" \
  --temp-dir "$RAY_TMP" --ray-client-server-port "$CLIENT_PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT" --disable-usage-stats >"$WORK/ray-head.log" 2>&1
WORKER_START=("$BIN/ray" start --address "$RAY_ADDRESS" --node-ip-address 127.0.0.1 --num-cpus "$WORKER_CPUS"
              --temp-dir "$RAY_TMP/worker" --disable-usage-stats)
if [ "$TOPOLOGY" = shared ]; then
  "${WORKER_START[@]}" >"$WORK/ray-worker.log" 2>&1
else
  # The worker node's image: the venv and the folder scorelab is imported from (PYTHONPATH counts).
  VENV="$(cd "$BIN/.." && pwd)"
  PKG_ROOT="$("$PY" -c 'import pathlib, scorelab; print(pathlib.Path(scorelab.__file__).resolve().parents[1])')"
  mkdir -p "$WORK/image"
  # In a mount namespace of its own (its mounts invisible to the rest of the machine): an empty read-only
  # tmpfs over the repository copy; one over this checkout, with the image bound back (staged under
  # $WORK/image first, since the tmpfs hides the originals); then `ray start` from /, so no process of
  # the node keeps a working directory inside what is hidden. Raylet, agents and every Ray worker
  # process descend from it and stay in the namespace.
  unshare --mount --propagation private -- bash -euo pipefail -c '
    copy=$1 repo=$2 img=$3 venv=$4 pkg=$5; shift 5
    mount -t tmpfs -o ro,size=64k,mode=755 scorelab-hidden "$copy"
    keep=()
    for k in "$venv" "$pkg"; do case "$k/" in "$repo"/*) keep+=("$k") ;; esac; done
    mount -t tmpfs -o size=64k,mode=755 scorelab-staging "$img"
    for i in "${!keep[@]}"; do mkdir "$img/$i"; mount --bind "${keep[$i]}" "$img/$i"; done
    mount -t tmpfs -o size=64k,mode=755 scorelab-hidden "$repo"
    for i in "${!keep[@]}"; do mkdir -p "${keep[$i]}"; mount --bind "$img/$i" "${keep[$i]}"; done
    mount -o remount,ro "$repo"
    umount -R "$img"
    cd /
    exec "$@"' isolate "$COPY" "$REPO" "$WORK/image" "$VENV" "$PKG_ROOT" "${WORKER_START[@]}" \
    >"$WORK/ray-worker.log" 2>&1 || { tail -20 "$WORK/ray-worker.log"; say "the worker node did not start"; exit 1; }
fi
NODES="$("$PY" -c "import ray; ray.init(address='$RAY_ADDRESS', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))" 2>/dev/null | tail -1)"
[ "$NODES" = 2 ] || { say "expected 2 Ray nodes, found $NODES"; exit 1; }
say "Ray cluster at $RAY_ADDRESS with $NODES nodes (head $HEAD_CPUS CPUs, worker $WORKER_CPUS CPUs, topology $TOPOLOGY)"

# --- the repository copy the DAG runs in --------------------------------------------------------------
# the project's files, never a run's record (dvc.lock, reports/): the copy's stages must not look done
(cd "$REPO" && git ls-files -co --exclude-standard -z | grep -zv -e '^dvc\.lock$' -e '^reports/' \
  | xargs -0 -I{} cp --parents {} "$COPY/")
(cd "$COPY" && git init -q)
"$PY" "$REPO/cluster/tiny_profile.py" "$COPY/params.yaml" --ray-address "$RAY_ADDRESS" \
  --tracking-uri "$TRACKING" --storage-path "$SHARED/ray"

# --- isolated: prove what the worker node sees, before anything depends on it -------------------------
if [ "$TOPOLOGY" = isolated ]; then
  "$PY" - "$RAY_ADDRESS" "$COPY" "$REPO" "$SHARED" "$TRACKING" "$WORKER_CPUS" "$VENV" "$PKG_ROOT" <<'EOF'
import os, sys
from pathlib import Path

import ray
import scorelab
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

address, copy, repo, shared, tracking, worker_cpus, venv, pkg_root = sys.argv[1:9]
ray.init(address=address, logging_level="ERROR")
alive = [n for n in ray.nodes() if n["Alive"]]
heads = [n for n in alive if "node:__internal_head__" in n["Resources"]]
others = [n for n in alive if n not in heads]
assert len(heads) == 1 and len(others) == 1, alive
head, worker = heads[0]["NodeID"], others[0]["NodeID"]
assert heads[0]["Resources"].get("CPU", 0) == 0, f"the head has CPUs: {heads[0]['Resources']}"
assert others[0]["Resources"].get("CPU") == float(worker_cpus), others[0]["Resources"]


@ray.remote
def probe(tag):
    import os, urllib.request
    import scorelab
    with open(os.path.join(shared, f".probe-{tag}"), "w") as f:
        f.write(tag)
    try:
        with urllib.request.urlopen(tracking + "/health", timeout=10) as r:
            health = r.status
    except OSError as e:
        health = repr(e)
    return {"node": ray.get_runtime_context().get_node_id(), "cwd": os.getcwd(), "scorelab": scorelab.__file__,
            "copy": sorted(os.listdir(copy)), "repo": sorted(os.listdir(repo)), "mlflow": health}


def on(node, cpus):
    return probe.options(num_cpus=cpus, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))


w, h, free = ray.get([on(worker, 1).remote("worker"), on(head, 0).remote("head"), probe.options(num_cpus=1).remote("any")])
ray.shutdown()
# the control: on the head, the same probe sees the copy, so an empty listing on the worker means hidden
assert "params.yaml" in h["copy"] and "params.yaml" in h["repo"], h
assert w["copy"] == [], f"the worker node sees the repository copy {copy}: {w['copy']}"
image = {Path(p).relative_to(repo).parts[0] for p in (venv, pkg_root) if Path(p).is_relative_to(repo)}
assert set(w["repo"]) <= image, f"the worker node sees {sorted(set(w['repo']) - image)} in {repo} beyond its image"
assert not Path(w["cwd"]).is_relative_to(copy) and not Path(w["cwd"]).is_relative_to(repo), w["cwd"]
assert w["mlflow"] == 200, f"the worker node cannot reach the MLflow server: {w['mlflow']}"
for tag in ("worker", "head", "any"):
    mark = Path(shared, f".probe-{tag}")
    assert mark.read_text() == tag, f"the shared folder is not shared: {mark}"
    mark.unlink()
assert free["node"] == worker, "a task that needs a CPU did not land on the worker node"
assert w["scorelab"] == h["scorelab"] == scorelab.__file__, (w["scorelab"], h["scorelab"], scorelab.__file__)
print(f"[cluster] isolation proven: the worker node {worker[:8]} ({worker_cpus} CPUs) sees nothing of {copy} and "
      f"only {sorted(image) or 'nothing'} of {repo}, writes the shared folder, reaches MLflow; the head "
      f"{head[:8]} (0 CPUs) sees the copy; a 1-CPU task lands on the worker node")
print(f"[cluster] scorelab imported from {os.path.dirname(scorelab.__file__)} by the driver and on both nodes")
EOF
fi

# --- the DAG against it -----------------------------------------------------------------------------
say "dvc repro of the tiny profile (log: $WORK/dvc.log)"
start=$(date +%s)
# The stages find the cluster through params (ray.address) alone: without RAY_ADDRESS, a stage that
# ignored it would start a Ray of its own on the head's disk, and the checks below would miss its work.
if ! (cd "$COPY" && env -u RAY_ADDRESS PATH="$BIN:$PATH" "$BIN/dvc" repro >"$WORK/dvc.log" 2>&1); then
  grep -av $'\e\\[36m(' "$WORK/dvc.log" | tail -30   # the stages' own lines, without the Ray workers' echo
  grep -aE '^(Running stage|ERROR|WARNING: failed)' "$WORK/dvc.log"
  say "dvc repro failed after $(( $(date +%s) - start )) s"; exit 1
fi
say "dvc repro finished in $(( $(date +%s) - start )) s"

# --- checks -----------------------------------------------------------------------------------------
STATUS="$(cd "$COPY" && PATH="$BIN:$PATH" "$BIN/dvc" status --json 2>&1)"
[ "$STATUS" = "{}" ] || { printf '%s\n' "$STATUS"; say "stages not done after dvc repro (dvc status)"; exit 1; }
"$PY" - "$COPY" "$TRACKING" "$SHARED" "$TOPOLOGY" "$RAY_ADDRESS" <<'EOF'
import os, sys
from collections import Counter
from pathlib import Path
from mlflow.tracking import MlflowClient

repo, uri, shared, topology, address = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4], sys.argv[5]
for f in ["outputs/train/vp/model.pt", "outputs/train/ve/model.pt", "outputs/tune/best_variant.yaml",
          "outputs/eval/vp/metrics.json", "outputs/eval/tuned/metrics.json", "reports/comparison.md"]:
    assert (repo / f).is_file(), f"missing output {f}"
client = MlflowClient(uri)
exp = client.get_experiment_by_name("scorelab-cluster-check")
assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:"), exp
runs = client.search_runs([exp.experiment_id])
names = sorted(r.info.run_name for r in runs)
assert names == sorted(["vp", "ve", "tuned", "tune", "tune-trial000", "tune-trial001", "comparison"]), names
unfinished = [(r.info.run_name, r.info.status) for r in runs if r.info.status != "FINISHED"]
assert not unfinished, f"MLflow runs not finished: {unfinished}"
# isolated: only the worker node has CPUs, so both Train workers share it; shared: SPREAD puts one on each
nodes = "1" if topology == "isolated" else "2"
for r in runs:
    if r.info.run_name in ("vp", "ve"):
        assert r.data.tags.get("ray.num_nodes") == nodes, (r.info.run_name, r.data.tags.get("ray.num_nodes"))
        assert "eval_sliced_w2_dpm_solver" in r.data.metrics or r.info.run_name == "ve", \
            (r.info.run_name, sorted(r.data.metrics), r.data.tags.get("eval_diverged"))
assert any((shared / "ray").iterdir()), "no Ray Train checkpoints on the shared storage"
assert any((shared / "mlartifacts").rglob("model.pt")), "no model artifact on the shared artifact store"
where = f"{nodes} Ray node{'s' if nodes != '1' else ''} in training"
if topology == "isolated":
    # where every task and actor of the DAG ran, from Ray's state API (the cluster is still up)
    import ray
    from ray.util.state import list_actors, list_tasks

    ray.init(address=address, logging_level="ERROR")
    worker = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"])
    # the dashboard of this cluster, named: the state API refuses to guess among several Rays on a machine
    kw = dict(address=os.environ["RAY_API_SERVER_ADDRESS"], detail=True, limit=10_000, raise_on_missing_output=False)
    short = lambda name: name.rsplit(".", 1)[-1]
    actors = [(short(a.class_name), a.node_id, a.required_resources or {}) for a in list_actors(**kw)]
    tasks = [(short(t.func_or_class_name), t.node_id, t.required_resources or {}) for t in list_tasks(**kw)
             if t.type == "NORMAL_TASK" and short(t.func_or_class_name) != "probe"]  # not the isolation probe's
    ray.shutdown()
    off = Counter(name for name, node, res in actors + tasks if res.get("CPU", 0) > 0 and node != worker)
    assert not off, f"work that needs CPUs ran off the worker node: {dict(off)}"
    on_worker = Counter(name for name, node, _ in actors + tasks if node == worker)
    on_head = Counter(name for name, node, _ in actors + tasks if node and node != worker)
    assert on_worker["RayTrainWorker"] >= 4, f"too few Ray Train workers on the worker node: {dict(on_worker)}"
    assert any(node == worker and res.get("CPU", 0) > 0 for _, node, res in tasks), \
        f"no task of the DAG (sampling) ran on the cluster's worker node: {dict(on_worker)}"
    print(f"[cluster] on the worker node: {dict(on_worker)}; on the head (0 CPUs): {dict(on_head)}")
    where = "every Train worker, Tune trial and task on the worker node"
print(f"[cluster] checks passed: every stage done, {len(runs)} MLflow runs finished on the PostgreSQL-backed "
      f"server, {where}, checkpoints and artifacts on the shared storage")
EOF

# --- isolated: a storage folder the worker node cannot see is refused before any work, in one line ----
if [ "$TOPOLOGY" = isolated ]; then
  "$PY" - "$COPY/params.yaml" "$COPY/outputs/ray-private" "$WORK/private.yaml" <<'EOF2'
import sys, yaml
p = yaml.safe_load(open(sys.argv[1]))
p["ray"]["storage_path"] = sys.argv[2]  # inside the repository copy: the driver sees it, the worker node does not
yaml.safe_dump(p, open(sys.argv[3], "w"), sort_keys=False)
EOF2
  set +e
  (cd "$COPY" && env -u RAY_ADDRESS "$PY" pipeline/train.py --params "$WORK/private.yaml" --variant vp \
    >"$WORK/private.log" 2>&1)
  rc=$?
  set -e
  refusal="$(grep -a "ray.storage_path '$COPY/outputs/ray-private' is a folder that node" "$WORK/private.log" || true)"
  if [ "$rc" != 1 ] || [ -z "$refusal" ] || grep -aq Traceback "$WORK/private.log"; then
    tail -20 "$WORK/private.log"; say "a storage path the worker node cannot see was not refused (exit $rc)"; exit 1
  fi
  say "refused as it should be: $refusal"
fi
