#!/usr/bin/env bash
# Everything a short lent GPU session should run, most important first, as one command under one cap.
# Device time is scarce (minutes, start-up included) and every separate command pays its own start and
# transfers, so the checks and figures issue 7 still needs run here one after another, each under a cap
# of its own; a stage that fails or runs out of time is recorded and the next one still runs.
#   lanes   STEPS=4000 TRIALS_PER_LANE=2 bench/gpu_lanes.sh 4: `run --per-gpu 1`, then 4, on CUDA
#           through the forked workers; aggregate trial-steps/s and where the trials' time goes, each
#           lane's first trial apart from its second ($OUT/lanes.json)
#   smoke   bench/gpu_smoke.sh: 4 boss-space trials of 300 steps, 4 per GPU, status, export, vote
#   steady  bench/gpu.sh --threads-only --threads-k 1,4: K trainers as threads, steady state
#           ($OUT/gpu.json)
# Caps (seconds) LANES_CAP, SMOKE_CAP, STEADY_CAP default to 230, 170, 130 (530 in all). Each stage's
# output goes to $OUT/session-<stage>.log (default OUT: bench/out) and a summary to $OUT/session.json.
# STAGES (default "lanes smoke steady") picks and orders them. DRY=1 runs them at toy sizes on the CPU
# (the smoke space on a tiny set; steady as gpu.sh's whole dry run, every section and check): a check of
# this script and of the ones it runs, not of a GPU.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHON=${PYTHON:-python3}  # the stages' interpreter
export OUT=${OUT:-$root/bench/out}
mkdir -p "$OUT"
stopping=0
child=""
# timeout puts each stage in a process group of its own, so a stop is passed on to it by hand; the
# stage's scripts then let their run mark its trials and end before they remove anything.
trap 'stopping=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM INT

summary=()
stage() {  # stage NAME CAP COMMAND...: run it under its cap, log it, record how it ended
  local name=$1 cap=$2
  shift 2
  local log="$OUT/session-$name.log" start rc
  start=$(date +%s)
  echo "gpu_session: $name (cap ${cap} s)"
  timeout --kill-after=30 "$cap" "$@" > "$log" 2>&1 &
  child=$!
  wait "$child"
  rc=$?
  while kill -0 "$child" 2>/dev/null; do  # a trapped signal ended the wait, not the stage
    wait "$child"
    rc=$?
  done
  child=""
  local took=$(($(date +%s) - start))
  local how="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then how="ran out of its ${cap} s"; elif [ "$rc" -ne 0 ]; then how="failed (exit $rc)"; fi
  echo "gpu_session: $name $how in ${took} s; last lines of $log:"
  tail -n 8 "$log" | sed 's/^/    /'
  summary+=("{\"stage\": \"$name\", \"exit\": $rc, \"seconds\": $took, \"cap\": $cap}")
}

stages=${STAGES:-lanes smoke steady}
case "${DRY:-0}" in 0 | 1) ;; *) echo "gpu_session: DRY must be 0 or 1, not '${DRY}'" >&2; exit 2 ;; esac
for name in $stages; do  # all of them checked before the first one spends any time
  case "$name" in
    lanes | smoke | steady) ;;
    *) echo "gpu_session: unknown stage '$name' in STAGES (known: lanes smoke steady)" >&2; exit 2 ;;
  esac
done
simple="$root/spaces/baselines/simple.yaml"
for name in $stages; do
  [ "$stopping" = 1 ] && break
  case "$name:${DRY:-0}" in
    lanes:0) stage lanes "${LANES_CAP:-230}" env STEPS=4000 TRIALS_PER_LANE=2 bash "$root/bench/gpu_lanes.sh" 4 ;;
    lanes:1) stage lanes "${LANES_CAP:-230}" env STEPS=10 PRESET=tiny CONFIG="$simple" bash "$root/bench/gpu_lanes.sh" 4 ;;
    smoke:0) stage smoke "${SMOKE_CAP:-170}" env TRIALS=4 STEPS=300 bash "$root/bench/gpu_smoke.sh" --per-gpu 4 ;;
    smoke:1) stage smoke "${SMOKE_CAP:-170}" env TRIALS=1 STEPS=10 PRESET=tiny SPACE=smoke bash "$root/bench/gpu_smoke.sh" --workers 1 ;;
    steady:0) stage steady "${STEADY_CAP:-130}" bash "$root/bench/gpu.sh" --threads-only --threads-k 1,4 ;;
    steady:1) stage steady "${STEADY_CAP:-130}" bash "$root/bench/gpu.sh" --dry-run --processes ;;
  esac
done
{
  echo "["
  for i in "${!summary[@]}"; do
    sep=","; [ "$i" -eq $((${#summary[@]} - 1)) ] && sep=""
    echo "  ${summary[$i]}$sep"
  done
  echo "]"
} > "$OUT/session.json"
[ "$stopping" = 1 ] && { echo "gpu_session: stopped" >&2; exit 143; }
for entry in "${summary[@]}"; do
  case $entry in *'"exit": 0,'*) ;; *) exit 1 ;; esac
done
echo "gpu_session: every stage ended well; figures in $OUT"
