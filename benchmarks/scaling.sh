#!/usr/bin/env bash
# Every mesh of 1, 2, 4, ... up to N GPUs for one preset, one launch each (benchmarks/scaling.py),
# then the table. Strong scaling: one sample per step split over the model group;
# weak scaling: one sample per data replica.
#   bash benchmarks/scaling.sh 8 jigsaw-1b [STORE]    # STORE: also through each rank's zarr tile reader
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
max=${1:?number of GPUs}; preset=${2:-jigsaw-1b}; store=${3:-}
rows=${ROWS:-benchmarks/scaling-$preset.jsonl}
export NCCL_NVLS_ENABLE=0
declare -A meshes=(
  [1]="1,1x1,1"
  [2]="2,1x1,1 1,2x1,1 1,1x2,1 1,1x1,2"
  [4]="4,1x1,1 1,2x2,1 1,4x1,1 1,1x1,4 1,2x1,2 2,2x1,1"
  [8]="8,1x1,1 1,4x2,1 1,8x1,1 1,2x2,2 2,2x2,1 2,2x1,2 4,2x1,1"
)
port=29700
for n in 1 2 4 8; do
  (( n <= max )) || break
  for mesh in ${meshes[$n]}; do
    for data in memory ${store:+zarr}; do
      port=$((port + 1))
      deepspeed --num_gpus "$n" --master_port "$port" --module benchmarks.scaling --preset "$preset" --mesh "$mesh" \
        --data "$data" ${store:+--store "$store"} --json "$rows" "${@:4}" \
        || echo "mesh $mesh on $n GPUs ($data inputs) failed; continuing"
    done
  done
done
python -m benchmarks.scaling --report "$rows"
echo "rows in $rows"
