#!/usr/bin/env bash
# The GPU measurements of issue 6, in stages that each fit one device call (10 min). On the device machine:
#   bash benchmarks/gpu/session.sh setup bench        # install the carried wheels; attention kernels + MFU
#   bash benchmarks/gpu/session.sh shakespeare        # shakespeare_char:gpu, 5000 steps, val loss
#   bash benchmarks/gpu/session.sh multi30k           # multi30k_en_de:gpu train + test BLEU
# with carry [".whl", ".data"] (from benchmarks/gpu/wheels.sh). Results go to $OUT (default ./gpu_out).
# SMOKE=1 shrinks every stage to a few steps (to check the script itself on a CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
PY=${PY:-python3}
RUNS=${RUNS:-/tmp/jaxformer_runs}
smoke() { if [ "${SMOKE:-0}" = 1 ]; then echo "$1"; else echo "$2"; fi; }

for stage in "$@"; do
  case "$stage" in
    setup)
      if ! $PY -c 'import ml_collections, tensorflow_datasets, tensorboardX' 2>/dev/null; then
        $PY -m pip install -q --no-index --no-deps .whl/*.whl
      fi
      $PY -m pip install -q --no-index --no-build-isolation --no-deps -e .
      $PY -m pip check | grep -iE 'jaxformer|tensorflow|ml.collections|tensorboard' || true
      (nvidia-smi -L || true; $PY -c 'import jax, flax; print(jax.__version__, flax.__version__, jax.devices())') \
        | tee "$OUT/setup.txt" ;;
    bench)
      $PY benchmarks/attention_kernels.py $(smoke '--lengths=64 --reps=1' '') | tee "$OUT/attention_kernels.txt"
      $PY benchmarks/train_throughput.py --rows=$(smoke gpt_tiny gpt2_small-shaped) --dtype=bfloat16 \
        $(smoke '--steps=2' '') | tee "$OUT/train_throughput_gpt2_bf16.txt"
      $PY benchmarks/train_throughput.py $(smoke '--rows=gpt_tiny --steps=2' '') | tee "$OUT/train_throughput.txt" ;;
    shakespeare)
      w="$RUNS/shk_gpu"
      $PY train.py --config=configs/shakespeare_char.py:gpu --workdir="$w" \
        --config.data.source=text:.data/tinyshakespeare/input.txt $(smoke '--config.train.num_steps=10' '') \
        2>&1 | tee "$OUT/shakespeare_gpu.log" | grep -E 'eval at|parameters|step [0-9]+/[0-9]+ .*(000|500)/'
      $PY eval.py --config=configs/shakespeare_char.py:gpu --workdir="$w" --split=validation \
        --config.train.eval_steps=-1 --output="$OUT/shakespeare_gpu_eval.json" | tail -12
      cp "$w/metrics.jsonl" "$OUT/shakespeare_gpu_metrics.jsonl" ;;
    multi30k)
      w="$RUNS/m30k_gpu"
      $PY train.py --config=configs/multi30k_en_de.py:gpu --workdir="$w" \
        --config.data.source=parallel:.data/multi30k $(smoke '--config.train.num_steps=10' '') \
        2>&1 | tee "$OUT/multi30k_gpu.log" | grep -E 'eval at|parameters|step [0-9]+/[0-9]+ .*000/'
      $PY eval.py --config=configs/multi30k_en_de.py:gpu --workdir="$w" --split=test \
        --config.train.eval_steps=$(smoke 1 -1) --output="$OUT/multi30k_gpu_test.json" | tail -14
      cp "$w/metrics.jsonl" "$OUT/multi30k_gpu_metrics.jsonl" ;;
    *) echo "unknown stage $stage (setup, bench, shakespeare, multi30k)"; exit 2 ;;
  esac
done
