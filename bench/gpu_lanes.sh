#!/usr/bin/env bash
# Trials per GPU as users get them: `spkid-search run --per-gpu K` on one fixed strong config, K = 1
# then the values given (default 4), each K running K * TRIALS_PER_LANE (default 1) trials of STEPS
# (default 1500) steps; CONFIG (default spaces/baselines/strong.yaml) and PRESET (the generated set,
# default small) can be changed. Prints, per K, the aggregate trial-steps/s from the study's own timestamps
# (first trial start to last trial end, so worker start-up is not counted) and from the command's wall
# time, each trial's step_mode, and where the trials' time went (each lane's first trial apart from the
# later ones). Writes $OUT/lanes.json (or bench/out/lanes.json).
#   bash bench/gpu_lanes.sh 2 4         # K = 1, 2, 4
# On a CPU machine --per-gpu has no effect (one CPU worker): the script still runs, as a check of itself.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
out=${OUT:-$root/bench/out}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A stop (timeout's SIGTERM, Ctrl-C) reaches the whole process group: bash then waits for the running
# command to mark its trials and end before it exits, so the folder is not removed under its workers.
trap 'echo "$(basename "$0"): stopped" >&2; exit 143' TERM INT
cd "$work"
steps=${STEPS:-1500}
per_lane=${TRIALS_PER_LANE:-1}
"$PY" -m search.cli synth --out data --preset "${PRESET:-small}" --quiet
"$PY" - "${CONFIG:-$root/spaces/baselines/strong.yaml}" <<'EOF'
import sys, yaml
params = yaml.safe_load(open(sys.argv[1]))
space = {"name": "lanes", "params": params, "pruner": {"name": "none"}}
open("lanes.yaml", "w").write(yaml.safe_dump(space))
EOF
for k in 1 "${@:-4}"; do
  trials=$((k * per_lane))
  t0=$(date +%s.%N)
  "$PY" -m search.cli run --space lanes.yaml --study "lanes$k" --trials "$trials" --steps "$steps" \
    --data data --per-gpu "$k" --quiet
  t1=$(date +%s.%N)
  "$PY" - "$k" "$trials" "$steps" "$t0" "$t1" "$out/lanes.json" <<'EOF'
import json, sys
from pathlib import Path
import optuna
k, trials, steps = (int(v) for v in sys.argv[1:4])
wall = float(sys.argv[5]) - float(sys.argv[4])
path = Path(sys.argv[6])
study = optuna.load_study(study_name=f"lanes{k}", storage=f"sqlite:///studies/lanes{k}/study.db")
done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
row = {
    "trials": len(done),
    "steps_per_trial": steps,
    "trial_steps_per_s": round(len(done) * steps / span, 1),
    "trial_steps_per_s_with_startup": round(len(done) * steps / wall, 1),
    "step_modes": sorted({t.user_attrs.get("step_mode", "?") for t in done}),
    "workers": sorted({t.user_attrs.get("worker", "?") for t in done}),
}
# Where a trial's time goes (means over the trials, seconds): train()'s phases as the trainer timed them
# (time_s: set-up, steps with the graph's warm-up and recording, validation, checkpoints, report), the
# rest of train() they leave out, and outside train() (claiming, config, storing the checkpoint). Also
# apart for each lane's first trial (it pays the process's first CUDA work: context, kernels' loading)
# and the later ones (TRIALS_PER_LANE >= 2), which a long study is made of.
def mean(values):
    return round(sum(values) / len(values), 2)
def parts(trials):
    duration = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    in_train = [t.user_attrs["wall_s"] for t in trials]
    times = [t.user_attrs["time_s"] for t in trials]
    out = {"trials": len(trials), "total": mean(duration)}
    for phase in times[0]:
        out[phase] = mean([time_s[phase] for time_s in times])
    out["rest_of_train"] = mean([w - sum(time_s.values()) for w, time_s in zip(in_train, times)])
    out["outside_train"] = mean([d - w for d, w in zip(duration, in_train)])
    return out
first = {}
for t in sorted(done, key=lambda t: t.datetime_start):
    first.setdefault(t.user_attrs.get("worker"), t.number)
row["trial_s"] = parts(done)
row["trial_s_first_of_lane"] = parts([t for t in done if t.number in first.values()])
later = [t for t in done if t.number not in first.values()]
if later:
    row["trial_s_later"] = parts(later)
result = json.loads(path.read_text()) if path.exists() and k != 1 else {}
result[str(k)] = row
path.write_text(json.dumps(result, indent=2))
print(f"gpu_lanes: --per-gpu {k}: {json.dumps(row)}")
EOF
done
