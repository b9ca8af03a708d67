#!/usr/bin/env bash
# How the reference model is trained on a lent GPU (the device tool): in the background, so that
# one run spans several device calls of at most 10 minutes each.
#   train_on_gpu.sh start MINUTES   measure the step rate, then train for about MINUTES (from the warm start)
#   train_on_gpu.sh wait SECONDS    follow the run's validation lines until it ends or SECONDS pass
#   train_on_gpu.sh collect DEST    pack the last saved checkpoint into DEST/ref.tgz.* (15 MB parts);
#                                   tar warns "file changed" if a save was under way: collect again
# To resume elsewhere: cat ref.tgz.* | tar -xz, then `vtprune train-reference --out ref --steps N
# --batch 64 --questions 3` with the N that `start` printed (the batches and schedule depend on them).
set -euo pipefail
run=/tmp/ref
batch=(--batch 64 --questions 3)
case "${1:-}" in
start)
  # The step rate decides the step count, so that the cosine schedule ends about when the time does.
  rm -rf /tmp/probe
  python3 -m vtprune.cli train-reference --out /tmp/probe --steps 40 "${batch[@]}" --eval-every 1000 \
    --eval-samples 8 >/tmp/probe.log 2>&1
  steps=$(python3 -c "
import json, sys
log = [json.loads(line) for line in open('/tmp/probe/train_log.jsonl')]
rate = 30 / (log[38]['elapsed_s'] - log[8]['elapsed_s'])
print(int(rate * 60 * float(sys.argv[1]) * 0.95))" "$2")
  echo "steps: $steps"
  setsid nohup python3 -m vtprune.cli train-reference --out $run --init benchmarks/reference_training/warm_start \
    --steps "$steps" "${batch[@]}" --eval-every 500 --minutes "$2" >/tmp/train.log 2>&1 &
  ;;
wait)
  end=$((SECONDS + $2))
  while [ $SECONDS -lt $end ] && pgrep -f "out $run" >/dev/null; do sleep 10; done
  tr '\r' '\n' </tmp/train.log | grep -E "validation|Error|error" || true
  tr '\r' '\n' </tmp/train.log | tail -n 2
  ;;
collect)
  tar -C /tmp -cz ref | split -b 15M - "$2/ref.tgz."
  ls -la "$2"
  ;;
*)
  sed -n 2,9p "$0"
  exit 2
  ;;
esac
