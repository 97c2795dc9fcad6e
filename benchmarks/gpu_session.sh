#!/usr/bin/env bash
# The GPU work of a session that borrows a card, as three calls that each fit the device tool's
# 10-minute limit (device time is scarce: run them back to back on one warm machine):
#
#   bash benchmarks/gpu_session.sh prepare     # build the extension, GPU tests, --quick benchmarks
#   bash benchmarks/gpu_session.sh ops         # bench_lora_ops sweep (issue 3)
#   bash benchmarks/gpu_session.sh train-peft  # bench_lora_train and bench_peft (issues 4, 5)
#
# Each step has its own time limit, a failed step does not stop the next, and everything goes
# under $OUT (the device tool's folder; default ./gpu_out): one log per step, steps.txt (exit code
# and seconds of each step), the benchmarks' JSON / Markdown / PNG, and nvidia-smi's view of the
# card. Copy the results into benchmarks/results/ afterwards. DEVICE=cpu QUICK=1 runs the same
# steps on a CPU machine (with --quick shapes) to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:+--quick}
mkdir -p "$OUT"
phase=${1:?usage: gpu_session.sh prepare|ops|train-peft}

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(($(date +%s) - start)) s" | tee -a "$OUT/steps.txt"
    tail -n 12 "$OUT/$name.log"
}

case $phase in
prepare)
    if command -v nvidia-smi >/dev/null; then nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1; fi
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
        | tee "$OUT/versions.txt"
    step build 240 env MAX_JOBS=16 python -m pip install --no-build-isolation --no-deps -e .
    step backends 60 python -c "import torch; from lora_fast import backends
print('extension', backends.extension())
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    print(dtype, backends.available('$DEVICE', dtype))"
    step gpu-tests 150 python -m pytest -q -m gpu --maxfail=20 --durations=10
    step ops-quick 60 python -m benchmarks.bench_lora_ops --device "$DEVICE" --quick --out-dir "$OUT"
    step train-quick 60 python -m benchmarks.bench_lora_train --device "$DEVICE" --quick --out-dir "$OUT"
    step peft-quick 60 python -m benchmarks.bench_peft --device "$DEVICE" --quick --out-dir "$OUT"
    ;;
ops)
    step ops 570 python -m benchmarks.bench_lora_ops --device "$DEVICE" $QUICK --out-dir "$OUT"
    ;;
train-peft)
    step train 280 python -m benchmarks.bench_lora_train --device "$DEVICE" $QUICK --out-dir "$OUT"
    step peft 280 python -m benchmarks.bench_peft --device "$DEVICE" $QUICK --out-dir "$OUT"
    ;;
*)
    echo "unknown phase $phase: prepare | ops | train-peft" >&2
    exit 2
    ;;
esac
