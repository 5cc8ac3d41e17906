#!/usr/bin/env bash
# Ray start-up per stage (docs/BENCHMARKS.md 4c): stages re-run alone, each with its own local Ray (plain
# dvc repro) against all attached to one local Ray (python -m scorelab with-local-ray, as make run does).
# Run it in a clone whose default run is complete (make run); it re-runs train@ddpm, sample@ddpm and tune there,
# removing their Ray checkpoints and sample chunks first so that nothing resumes.
#   bash bench/ray_startup_ab.sh [REPO] [OUT]     (default: this repository, OUT = /tmp/ray_startup_ab)
set -uo pipefail
REPO=$(cd "${1:-$(dirname "$0")/..}" && pwd)
OUT=${2:-/tmp/ray_startup_ab}
mkdir -p "$OUT"
cd "$REPO"
export PATH="$REPO/.venv/bin:$PATH" DVC_NO_ANALYTICS=1 OUT

stage() {  # stage, what to remove first, label
  rm -rf $2
  local s e
  s=$(date +%s.%N); dvc repro -f --single-item "$1" > "$OUT/$1.$3.log" 2>&1; local rc=$?; e=$(date +%s.%N)
  echo "$1 $3 $(python3 -c "print(round($e - $s, 1))") rc=$rc" | tee -a "$OUT/results.txt"
}
round() {  # label [tune]
  stage train@ddpm "outputs/ray/ddpm-*" "$1"
  stage sample@ddpm outputs/samples/ddpm "$1"
  if [ "${2:-}" = tune ]; then stage tune "outputs/ray/tune-*" "$1"; fi
}
shared() {  # the same round inside one shared local Ray; also times the Ray's start and stop
  local s e
  s=$(date +%s.%N)
  python -m scorelab with-local-ray -- bash -c "$(declare -f stage round); round shared-$1 ${2:-}"
  e=$(date +%s.%N)
  echo "wrapper-total shared-$1 $(python3 -c "print(round($e - $s, 1))")" | tee -a "$OUT/results.txt"
}

round own-1 tune
shared 1 tune
round own-2
shared 2
