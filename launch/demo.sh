#!/usr/bin/env bash
# The whole chain on a small synthetic ERA5, on what the machine has: 2 GPUs (two longitude
# tiles, domain 1x2) where nvidia-smi lists two or more, the one GPU of a workstation (domain
# 1x1), or 2 CPU processes (domain 1x2):
#   install -> netCDF files -> zarr store -> train with the deepspeed launcher
#   -> checkpoint -> forecast from it -> evaluate against persistence and climatology.
# With --ensemble, then: fine-tune on the CRPS of 2 members, one per sample rank (mesh.sample = 2;
#   both on the one GPU of a workstation) -> an 8-member ensemble forecast -> CRPS, spread/skill,
#   rank histograms.
# Outputs go to outputs/demo/ (override with DEMO_DIR); DEMO_STEPS shortens the training;
# DEMO_GPUS=N uses N GPUs (0: the CPU) instead of counting them; DEMO_PLAN_ONLY=1 prints the
# choice and stops.
set -euo pipefail
ensemble=false
for arg in "$@"; do
    case $arg in
        --ensemble) ensemble=true ;;
        *) echo "usage: launch/demo.sh [--ensemble]" >&2; exit 2 ;;
    esac
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

gpus=${DEMO_GPUS:-0}
if [ -z "${DEMO_GPUS:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if [ "$gpus" -ge 2 ]; then
    accelerator=cuda processes=2 grid=1x2 what="2 of the $gpus GPUs, one longitude tile each (domain 1x2)"
elif [ "$gpus" -eq 1 ]; then
    accelerator=cuda processes=1 grid=1x1 what="the one GPU, the whole grid on it (domain 1x1)"
else
    accelerator=cpu processes=2 grid=1x2 what="2 CPU processes, one longitude tile each (domain 1x2; no GPU found)"
fi
echo "demo: training and forecasting on $what"
[ "${DEMO_PLAN_ONLY:-0}" = 1 ] && exit 0

bash .ci/install.sh
source .venv/bin/activate
export DS_ACCELERATOR=${DS_ACCELERATOR:-$accelerator}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
out=${DEMO_DIR:-outputs/demo}
steps=${DEMO_STEPS:-800}
stages=$($ensemble && echo 8 || echo 5)
mkdir -p "$out"

# 2020-01-01 .. 2021-01-05, 6-hourly: the model trains on 2020-01-01 .. 2020-12-07 (every season) and is
# scored from initial times 2020-12-24 .. 2021-01-03, a season it has seen, on days it has not.
data="33x64, 2020-01-01 + 1484 steps of 6 h"
echo "== 1/$stages synthetic ERA5-like netCDF files ($data) -> $out/netcdf"
if [ "$(cat "$out/netcdf/.complete" 2>/dev/null)" != "$data" ]; then  # absent, or from another demo version
    rm -rf "$out/netcdf" "$out/era5.zarr"
    python -m data.synthetic "$out/netcdf" --grid 33x64 --steps 1484 && echo "$data" > "$out/netcdf/.complete"
fi

echo "== 2/$stages preprocess into a zarr store -> $out/era5.zarr"
python launch/preprocess.py "$out/netcdf" --output "$out/era5.zarr" --config configs/data/demo.yaml \
    --tile-grid 1x2 --statistics-period 2020-01-01,2020-12-07

echo "== 3/$stages train on $processes process(es) (deepspeed launcher, domain $grid) -> $out/run"
rm -rf "$out/run"
deepspeed --num_gpus "$processes" launch/train.py --config configs/train/demo.yaml \
    --set "data.store=$out/era5.zarr" --set "checkpoint.dir=$out/run" --set "training.steps=$steps" \
    --set "mesh.domain=[${grid%x*}, ${grid#*x}]" \
    --set "training.rollout=[{from_step: 0, steps: 1}, {from_step: $((steps / 2)), steps: 2}, {from_step: $((steps * 4 / 5)), steps: 4}]"

echo "== 4/$stages forecast 2 days ahead from the checkpoint, on $processes process(es) -> $out/forecast.zarr"
deepspeed --num_gpus "$processes" launch/forecast.py --checkpoint "$out/run/model.pt" --store "$out/era5.zarr" \
    --output "$out/forecast.zarr" --init 2020-12-24T00:2021-01-03T00:12 --steps 8 --domain "$grid" --overwrite

echo "== 5/$stages evaluate against persistence and climatology -> $out/evaluation"
python launch/evaluate.py --forecast "$out/forecast.zarr" --store "$out/era5.zarr" --output "$out/evaluation" \
    --climatology-period 2020-01-01:2020-12-07

if $ensemble; then
    echo "== 6/$stages fine-tune on the CRPS of 2 members over $processes sample rank(s) -> $out/ensemble-run"
    rm -rf "$out/ensemble-run"
    deepspeed --num_gpus "$processes" launch/train.py --config configs/train/demo-ensemble.yaml \
        --init-from "$out/run/model.pt" --set "data.store=$out/era5.zarr" --set "checkpoint.dir=$out/ensemble-run" \
        --set "mesh.sample=$processes"

    echo "== 7/$stages an 8-member ensemble forecast over $processes sample rank(s) -> $out/ensemble.zarr"
    deepspeed --num_gpus "$processes" launch/forecast.py --checkpoint "$out/ensemble-run/model.pt" \
        --store "$out/era5.zarr" --output "$out/ensemble.zarr" --init 2020-12-24T00:2021-01-03T00:12 --steps 8 \
        --members 8 --sample "$processes" --overwrite

    echo "== 8/$stages CRPS, spread/skill and rank histograms of the ensemble -> $out/ensemble-evaluation"
    python launch/evaluate.py --forecast "$out/ensemble.zarr" --store "$out/era5.zarr" \
        --output "$out/ensemble-evaluation" --climatology-period 2020-01-01:2020-12-07
fi

echo
echo "demo outputs in $out/: netcdf/ (inputs), era5.zarr (store), run/ (checkpoints, metrics.jsonl, model.pt),"
echo "forecast.zarr, evaluation/ (scores.json, scorecard.md, rmse.png, map_*.png)"
if $ensemble; then
    echo "ensemble-run/, ensemble.zarr, ensemble-evaluation/ (scorecard.md with CRPS and spread/skill,"
    echo "rank_histogram.png; the deterministic model's MAE, which the CRPS compares with, is in evaluation/)"
fi
