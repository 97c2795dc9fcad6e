#!/usr/bin/env bash
# The GPU work of a session that borrows a card. A task that draws one gets 15 minutes of device
# time in all, machine start included, and a machine goes back 30 s after a call, so the whole of
# it is one call of under 10 minutes:
#
#   bash benchmarks/gpu_session.sh all         # everything below, step limits summing to 560 s
#
# or, where more device time is lent, the same work in three calls of up to 10 minutes each:
#
#   bash benchmarks/gpu_session.sh prepare     # build the extension, GPU tests, --quick benchmarks
#   bash benchmarks/gpu_session.sh ops         # bench_lora_ops sweep (issue 3)
#   bash benchmarks/gpu_session.sh train-peft  # bench_lora_train and bench_peft (issues 4, 5)
#
# Each step has its own time limit and a failed step does not stop the next. Logs and results go
# to $WORK (default ./gpu_work): one log per step, steps.txt (exit code and seconds of each step),
# the benchmarks' JSON / Markdown / PNG, and nvidia-smi's view of the card. The device tool brings
# back at most 8 files from $OUT, so the phase ends by packing $WORK into one archive
# $OUT/gpu_<phase>.tar.gz, with steps.txt beside it. Unpack it and copy the results into
# benchmarks/results/. DEVICE=cpu QUICK=1 runs the same steps on a CPU machine (with --quick
# shapes) to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
WORK=${WORK:-gpu_work}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:+--quick}
mkdir -p "$OUT" "$WORK"
phase=${1:?usage: gpu_session.sh all|prepare|ops|train-peft}

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $WORK/NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    start=$(date +%s)
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc $(($(date +%s) - start)) s" | tee -a "$WORK/steps.txt"
    tail -n 12 "$WORK/$name.log"
}

build_and_test() {  # build_and_test BUILD_S TESTS_S
    if command -v nvidia-smi >/dev/null; then nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1; fi
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
        | tee "$WORK/versions.txt"
    step build "$1" env MAX_JOBS=16 python -m pip install --no-build-isolation --no-deps -e .
    step backends 30 python -c "import torch; from lora_fast import backends
print('extension', backends.extension())
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    print(dtype, backends.available('$DEVICE', dtype))"
    step gpu-tests "$2" python -m pytest -q -m gpu --maxfail=20 --durations=10
}

case $phase in
all)
    # 150 + 30 + 100 + 120 + 40 + 120 = 560 s; bf16 only for the op sweep (the issue's reference
    # numbers are bf16), rank 16 only for the training sweep
    build_and_test 150 100
    step ops 120 python -m benchmarks.bench_lora_ops --device "$DEVICE" $QUICK --dtype bfloat16 --out-dir "$WORK"
    step train 40 python -m benchmarks.bench_lora_train --device "$DEVICE" $QUICK --ranks 16 --out-dir "$WORK"
    step peft 120 python -m benchmarks.bench_peft --device "$DEVICE" $QUICK --out-dir "$WORK"
    ;;
prepare)
    build_and_test 240 150
    step ops-quick 60 python -m benchmarks.bench_lora_ops --device "$DEVICE" --quick --out-dir "$WORK"
    step train-quick 60 python -m benchmarks.bench_lora_train --device "$DEVICE" --quick --out-dir "$WORK"
    step peft-quick 60 python -m benchmarks.bench_peft --device "$DEVICE" --quick --out-dir "$WORK"
    ;;
ops)
    step ops 570 python -m benchmarks.bench_lora_ops --device "$DEVICE" $QUICK --out-dir "$WORK"
    ;;
train-peft)
    step train 280 python -m benchmarks.bench_lora_train --device "$DEVICE" $QUICK --out-dir "$WORK"
    step peft 280 python -m benchmarks.bench_peft --device "$DEVICE" $QUICK --out-dir "$WORK"
    ;;
*)
    echo "unknown phase $phase: all | prepare | ops | train-peft" >&2
    exit 2
    ;;
esac
tar czf "$OUT/gpu_$phase.tar.gz" -C "$WORK" .
cp "$WORK/steps.txt" "$OUT/steps.txt"
echo "packed $(tar tzf "$OUT/gpu_$phase.tar.gz" | wc -l) entries into $OUT/gpu_$phase.tar.gz"
