#!/usr/bin/env bash
# Issue 17 item 5 for one more model family on a lent GPU (after benchmarks/gpu/issue17.sh): one call of under 10
# minutes per preset, in the sessions that follow.
#   run(command="bash benchmarks/gpu/issue17_family.sh llava-next-7b", carry=[".gpu-wheels"], timeout_s=590)
# Presets (vtprune.bench.presets): llava-next-7b, llava-onevision-7b, video-llava-7b, qwen2.5-vl-7b. Steps, as in
# issue17.sh, the work folder packed into $OUT/issue17-PRESET.tgz after each:
#   1. batch 16, every method the family supports at 192 and 64 against both oracles (5 repeats after 1 warm-up:
#      an unpruned LLaVA-NeXT prefill of 16 x ~2900 tokens takes about a second);
#   2. batch 1, prefill compiled as CUDA graphs (--compile cudagraphs), the methods named below.
# A second argument runs it elsewhere (`bash benchmarks/gpu/issue17_family.sh llava-next-cpu-small cpu` rehearses the
# plumbing here; its steps then stop at their time limits).
set -uo pipefail
preset=${1:?"name a preset: llava-next-7b, llava-onevision-7b, video-llava-7b or qwen2.5-vl-7b"}
device=${2:-cuda}
out=${OUT:-/tmp/out}
work=$(mktemp -d)
mkdir -p "$out"
pack() { tar czf "$out/issue17-$preset.tgz" -C "$work" .; }
if [ "$device" = cuda ]; then
  python3 -c "import rich, pytest" 2>/dev/null || python3 -m pip install -q --no-index --no-deps .gpu-wheels/*.whl
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$work/gpu.txt"
  dtype=bfloat16
else
  dtype=float32
fi
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" | tee -a "$work/gpu.txt"

every=clasp,clse,clse_m,dart,divprune,fastv,ficoco_v,hired,pdrop,pool,prumerge+,random,sparsevlm,tome,uniform,visionzip,vispruner
bench() {  # bench STEP SECONDS ARGS...: one `vtprune bench` into $work/STEP/<device>/, its log beside
  local step=$1 seconds=$2
  shift 2
  timeout "$seconds" python3 -m vtprune.cli bench --device "$device" --dtype "$dtype" --arch "$preset" \
    --out "$work/$step" "$@" >"$work/$step.log" 2>&1
  echo "step $step: exit $? after ${SECONDS}s"
  tail -n 45 "$work/$step.log"
  pack
}

bench b16 380 --methods "$every" --budgets 192,64 --batch 16 --repeats 5 --warmup 1 --new-tokens 4
bench b1c 150 --methods random,fastv,clse,visionzip,clasp --budgets 192,64 --batch 1 --compile cudagraphs \
  --repeats 10 --warmup 3 --new-tokens 4
