#!/usr/bin/env bash
# The GPU variant of the built-in students (synth-{liver,kidney}-gpu.yaml), both tasks side by
# side on one GPU: validation cases, teacher, kd student, then the student's best and last
# checkpoints exported (float16) to OUT/<task>-best and OUT/<task>-last, logs in OUT/<task>.log.
# Calibration and the choice against the shipped model follow on any machine (README, "Models").
# The teacher stage is the recipe's (4.2 minutes); the student stage's settings are below.
#   training/models_gpu.sh [OUT]   (env: HLFD_TRAIN, the hlfd-train command; TEACHER_MINUTES and
#                                  STUDENT_MINUTES, the two stages' budgets; SET, more --set)
set -euo pipefail
out=${1:-runs/gpu}
train=${HLFD_TRAIN:-hlfd-train}
student_min=${STUDENT_MINUTES:-2.4}
export OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1   # one core per data worker
mkdir -p "$out"

stages() {  # task: validation cases, teacher, kd student, export
  local cfg=training/configs/synth-$1-gpu.yaml layout=kits19
  [ "$1" = liver ] && layout=msd
  [ -d "data/synth-$1-val" ] || $train synth write "data/synth-$1-val" --task "$1" \
    --cases 6 --seed 2000 --layout "$layout" || return 1
  # shellcheck disable=SC2086
  $train teacher -c "$cfg" -q --set train.minutes="${TEACHER_MINUTES:-4.2}" ${SET:-} &&
    $train distill -c "$cfg" -q --set train.minutes="$student_min" train.lr=3.0e-4 \
      train.warmup_steps=50 train.val_every=500 train.checkpoint_every=500 ${SET:-} &&
    for which in best last; do
      $train export "runs/synth-$1-gpu/kd-seed0" --which "$which" --half --no-timing \
        -o "$out/$1-$which" || return 1
    done
}
stages liver > "$out/liver.log" 2>&1 & liver=$!
stages kidney > "$out/kidney.log" 2>&1 & kidney=$!
status=0
wait $liver || { status=1; echo "liver failed: $out/liver.log" >&2; }
wait $kidney || { status=1; echo "kidney failed: $out/kidney.log" >&2; }
exit $status
