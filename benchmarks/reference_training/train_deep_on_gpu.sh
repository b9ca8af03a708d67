#!/usr/bin/env bash
# How the deep reference model (issue 18) is trained on lent GPUs: ~24 minutes of training in three
# sessions of 15 device minutes, one device call each, handed from one to the next through $OUT
# (README.md beside this file, "Deep reference model", has the commands of each session).
#   train_deep_on_gpu.sh session MINUTES TOTAL DEST
#       one device call's work: start MINUTES TOTAL, wait for the run to stop, collect DEST
#   train_deep_on_gpu.sh start MINUTES TOTAL
#       resume this machine's run, else the hand-off carried in (.reference_training/deep/ or
#       benchmarks/reference_training/deep_handoff/), else start afresh: measure the step rate
#       and size a run of TOTAL minutes. Trains in the background for MINUTES, then stops,
#       validated and saved
#   train_deep_on_gpu.sh wait SECONDS     follow the run until it stops or SECONDS pass
#   train_deep_on_gpu.sh collect DEST     the last save as DEST/handoff.tar.NN (carry it to the
#       next session), DEST/model.tar.NN (the model folder) and DEST/train-deep.log
#   train_deep_on_gpu.sh size             here, before a session: what travels, against 64 MiB
# Options, before the command (a CPU rehearsal sets them; README.md): --run DIR (the run's folder),
# --carried DIR (where the hand-off lies), --batch "ARGS" (train-reference's batch flags), --probe STEPS,
# --extra "ARGS" (more train-reference flags), --python PYTHON.
set -euo pipefail
run=/tmp/ref-deep
carried=
batch_args="--batch 64 --questions 3"  # the exact run: 64 images x 3 questions a step
extra_args=
probe_steps=40
python=python3
while [[ "${1:-}" == --* ]]; do
  case "$1" in
  --run) run=$2 ;;
  --carried) carried=$2 ;;
  --batch) batch_args=$2 ;;
  --probe) probe_steps=$2 ;;
  --extra) extra_args=$2 ;;
  --python) python=$2 ;;
  *) echo "unknown option $1 (options: --run --carried --batch --probe --extra --python)"; exit 2 ;;
  esac
  shift 2
done
# Where the previous session's handoff.tar.NN lie: an ignored folder named in the device call's carry,
# or, where the checkout does not outlive a session, a committed one. Exactly one of them may hold parts.
if [ -z "$carried" ]; then
  for folder in .reference_training/deep benchmarks/reference_training/deep_handoff; do
    if [ -f "$folder/handoff.tar.00" ]; then
      if [ -n "$carried" ]; then echo "hand-offs in both $carried and $folder: keep one"; exit 1; fi
      carried=$folder
    fi
  done
  carried=${carried:-.reference_training/deep}
fi
read -r -a batch <<<"$batch_args"
read -r -a extra <<<"$extra_args"
log=$run.log

running() { pgrep -f -- "--out $run " >/dev/null; }

# Steps a second at the exact settings, from a short run of a fresh model (the first quarter, loader
# start-up and CUDA warm-up, left out), and so the step count that fills `total` minutes.
step_count() {
  local total=$1
  rm -rf "$run-probe"
  "$python" -m vtprune.cli train-reference --out "$run-probe" --depth deep --steps "$probe_steps" "${batch[@]}" \
    "${extra[@]}" --eval-every 100000 --eval-samples 8 >"$run-probe.log" 2>&1 || { tail -n 20 "$run-probe.log" >&2; exit 1; }
  "$python" -c "
import json, sys
log = [json.loads(line) for line in open(sys.argv[1])]
first = len(log) // 4
rate = (len(log) - 1 - first) / (log[-1]['elapsed_s'] - log[first]['elapsed_s'])
print(f'{rate:.2f} steps/s', file=sys.stderr)
print(int(rate * 60 * float(sys.argv[2]) * 0.95))  # 5% for the validations" "$run-probe/train_log.jsonl" "$total"
}

start() {
  local minutes=$1 total=$2
  if running; then echo "a run is going already"; exit 1; fi
  if [ -f "$run/training_state.pt" ]; then
    echo "resuming this machine's run at $run"
  elif [ -f "$carried/handoff.tar.00" ]; then
    rm -rf "$run"
    "$python" -m vtprune.synth.handoff unpack "$carried" "$run"
    echo "resuming the hand-off from $carried"
  else
    local steps
    steps=$(step_count "$total")
    mkdir -p "$run"
    echo "--depth deep --init vtprune/reference_model --steps $steps ${batch[*]} --eval-every 500" >"$run/run_args"
    echo "fresh run of $steps steps"
  fi
  read -r -a args <"$run/run_args"
  echo "train-reference --out $run ${args[*]} ${extra[*]} --minutes $minutes"
  setsid nohup "$python" -m vtprune.cli train-reference --out "$run" "${args[@]}" "${extra[@]}" --minutes "$minutes" \
    >>"$log" 2>&1 </dev/null &
  sleep 5
}

follow() {
  local end=$((SECONDS + $1))
  while [ $SECONDS -lt $end ] && running; do sleep 5; done
  tr '\r' '\n' <"$log" | grep -E "validation|resuming|up-scaling|Error|error" || true
  tr '\r' '\n' <"$log" | grep "train-reference:" | tail -n 1
  if running; then echo "still running"; fi
}

collect() {
  local dest=$1
  if running; then echo "still running: collecting its last save (the last validation)"; fi
  "$python" -m vtprune.synth.handoff pack "$run" "$dest"
  { tr '\r' '\n' <"$log" | grep -vE "^(train-reference|Writing model shards|Loading weights): |^\s*$" || true  # all but progress bars
    tr '\r' '\n' <"$log" | grep "train-reference:" | tail -n 1; } >"$dest/train-deep.log"
  ls -l "$dest"
}

case "${1:-}" in
session)
  began=$SECONDS
  start "$2" "$3"
  follow $((590 - (SECONDS - began) - 20))  # a device call ends at 600 s; collecting takes seconds
  collect "$4"
  ;;
start) start "$2" "$3" ;;
wait) follow "$2" ;;
collect) collect "$2" ;;
size)
  tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
  carry=$(du -sb "$carried" 2>/dev/null | cut -f1 || true)
  echo "working tree $((tree / 1048576)) MiB + $carried $((${carry:-0} / 1048576)) MiB = $(((tree + ${carry:-0}) / 1048576)) MiB (at most 64)"
  ;;
*)
  awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"
  exit 2
  ;;
esac
