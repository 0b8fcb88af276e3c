#!/usr/bin/env bash
# The GPU checks, in one script for a lent GPU machine whose Python has torch/timm but no Ray or MLflow
# (so only the Ray-free dynamix_core benchmarks run there). Reports land in $OUT (default bench_results/gpu).
#
#   bash benchmarks/gpu_checks.sh throughput      # training-step MFU, pre-training images/s + MFU, bank, DBSCAN
#   bash benchmarks/gpu_checks.sh pretrain-knn DATA   # bare-backbone kNN mAP after MoCo v3, variants in parallel
#   bash benchmarks/gpu_checks.sh pretrain-knn-seeds DATA   # one variant (STEPS, default 900), seeds 0 1 2 in parallel
#
# DATA is a folder prepared by `dynamix demo` (its shards/synth_video, synth_target, synth_m0).
# QUICK=1 runs every step at its smoke size (CPU); ONLY="train_step pretrain" runs only the steps named. Each step has its own time limit, so one slow
# step cannot eat the others' time; a step that ran out says so in the log.
set -u
PHASE=${1:?throughput or pretrain-knn}
OUT=${OUT:-bench_results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
Q=${QUICK:+--quick}
LOG=$OUT/$PHASE.log

step() {  # step SECONDS NAME CMD...: run with a time limit, log it, say how it ended
    local limit=$1 name=$2; shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    local t0=$SECONDS
    echo "=== $name: $*" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (time limit)')" | tee -a "$LOG"
}

case $PHASE in
throughput)
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
      $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } | tee -a "$LOG"
    step 90 train_step $PY benchmarks/bench_train_step.py $Q --out "$OUT/train_step.md"
    step 80 pretrain $PY benchmarks/bench_pretrain.py $Q --out "$OUT/pretrain.md"
    step 90 centroids $PY benchmarks/bench_centroids.py ${Q:---sizes 434000 1000000} --device "${DEVICE:-cuda}" --threads 16 --out "$OUT/centroids.md"
    step 60 labeling $PY benchmarks/bench_labeling.py $Q --device "${DEVICE:-cuda}" --out "$OUT/labeling.md"
    step 120 pretrain_compile $PY benchmarks/bench_pretrain.py $Q --compile --out "$OUT/pretrain_compile.md"
    step 120 train_step_compile $PY benchmarks/bench_train_step.py $Q --compile --out "$OUT/train_step_compile.md"
    ;;
pretrain-knn)
    DATA=${2:?the data folder}
    common=(--data "$DATA" --seeds 0 --view-threads 3 --threads 1 $Q)
    long=(--steps "${STEPS:-1200}" --batch 64 --buffer-videos 32)
    # variants run side by side (resnet18 at 128x64 keeps the GPU far from full; views are the CPU work)
    step 240 knn_recipe $PY benchmarks/bench_pretrain_knn.py "${common[@]}" --out "$OUT/knn_recipe.md" &
    step 240 knn_long $PY benchmarks/bench_pretrain_knn.py "${common[@]}" "${long[@]}" --out "$OUT/knn_long.md" &
    step 240 knn_video $PY benchmarks/bench_pretrain_knn.py "${common[@]}" "${long[@]}" --max-images-per-video 8 \
        --buffer-videos 8 --out "$OUT/knn_video.md" &
    step 240 knn_crop $PY benchmarks/bench_pretrain_knn.py "${common[@]}" "${long[@]}" --crop-min 0.5 --out "$OUT/knn_crop.md" &
    step 240 knn_video_crop $PY benchmarks/bench_pretrain_knn.py "${common[@]}" "${long[@]}" --max-images-per-video 8 \
        --buffer-videos 8 --crop-min 0.5 --out "$OUT/knn_video_crop.md" &
    wait
    ;;
pretrain-knn-seeds)
    # the best variant of pretrain-knn (8 frames from each of 8 videos per 64-image batch), one process per seed
    DATA=${2:?the data folder}
    for seed in 0 1 2; do
        step "${LIMIT:-450}" "knn_seed$seed" $PY benchmarks/bench_pretrain_knn.py --data "$DATA" --seeds $seed --threads 1 \
            --view-threads "${VIEW_THREADS:-5}" --steps "${STEPS:-900}" --batch 64 --max-images-per-video 8 --buffer-videos 8 \
            $Q --out "$OUT/knn_seed$seed.md" &
    done
    wait
    ;;
*) echo "unknown phase $PHASE (throughput, pretrain-knn or pretrain-knn-seeds)" >&2; exit 2 ;;
esac
