#!/usr/bin/env bash
# Every GPU check of the performance issue in one go, on one GPU (budget: ~10 minutes).
#
#   bash experiments/gpu_perf.sh            # writes $OUT (default ./gpu_out)
#
# 1. the outer-iteration table (exact / truncated / satm) for the named shapes,
# 2. TF32 against `highest` precision on the hypergradient,
# 3. evaluation speed (5 ConvNets x 1000 epochs at CIFAR-10 IPC 10 and 50 shapes),
# 4. end to end: Fashion-MNIST IPC 10 with the paper protocol (needs the four idx files in
#    $FMNIST_DIR, default .gpu_data/fashion_mnist; copy them from
#    /usr/share/datasets/fashion-mnist and name that folder in the device tool's `carry`).
# Each step is time-limited so one slow step cannot eat the whole budget.
set -uo pipefail
OUT=${OUT:-gpu_out}
FMNIST_DIR=${FMNIST_DIR:-.gpu_data/fashion_mnist}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

bench() { timeout "$1" python3 -m experiments.bench "${@:2}" 2>>"$OUT/bench.err" | tee -a "$OUT/bench.jsonl"; }
bench 120 --config=c10-ipc10 --mode=exact,truncated,satm --truncate=10
bench 120 --config=c100-ipc50 --mode=exact,satm
bench 120 --config=tiny-ipc10 --mode=exact,satm
bench 90 --config=tiny-ipc50 --mode=exact --iters=3
bench 90 --config=in1k-ipc1 --mode=exact --iters=3
bench 60 --config=c10-ipc10 --mode=exact --steps_per_call=10
# The second-derivative mode: `auto` is reverse-over-reverse on a GPU; forward-over-reverse is
# the CPU's default (docs/PERFORMANCE.md) and unmeasured here.
bench 90 --config=c10-ipc10 --mode=exact,satm --second_order=forward
bench 60 --config=c10-ipc10 --mode=eval --eval_epochs=1000
bench 60 --config=c10-ipc10 --ipc=50 --mode=eval --eval_epochs=1000
timeout 90 python3 -m experiments.precision_check --config=c10-ipc10 2>>"$OUT/bench.err" | tee "$OUT/precision.jsonl"

if [ -d "$FMNIST_DIR" ]; then
  ( time timeout 300 python3 -m experiments.run --dataset=fashion_mnist --data_dir="$FMNIST_DIR" \
      --ipc=10 --method=satm --preset=paper --num_experts=10 --expert_parallel=10 \
      --workdir="$OUT/fmnist_ipc10" --progress=false ) > "$OUT/e2e.log" 2>&1
  cp "$OUT/fmnist_ipc10/results.json" "$OUT/e2e_results.json" 2>/dev/null
  tail -5 "$OUT/e2e.log"
else
  echo "no Fashion-MNIST files in $FMNIST_DIR: end-to-end run skipped" | tee "$OUT/e2e.log"
fi
