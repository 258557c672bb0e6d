#!/usr/bin/env bash
# Side-by-side timings of taming-rs and the reference (PyTorch) on this machine, in one run, so
# that ratios do not suffer from drift between runs. Needs a release build and a Python with
# torch + taming-transformers-rom1504 (PY, default python3).
#   bench/compare.sh first-stage | sample | train
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
T=target/release/taming
case "${1:-sample}" in
  first-stage)
    C=configs/bench_imagenet_vqgan.yaml
    $T bench first-stage --config $C --random-weights --size 256
    $PY bench/pytorch_infer.py first-stage $C --size 256 ;;
  sample)
    C=configs/bench_transformer_full.yaml
    for b in 1 8; do
      $T bench sample --config $C --random-weights --cond-tokens 1 --tokens 256 --batch $b
      $PY bench/pytorch_infer.py sample $C --cond-tokens 1 --tokens 256 --batch $b
    done
    # label-to-image shape: 256 condition tokens; the reference samples these without a cache
    $T bench sample --config $C --random-weights --cond-tokens 256 --tokens 256 --batch 1 ;;
  train)
    # a VQGAN training step with the discriminator active (PyTorch: bench/pytorch_train_step.py)
    C=configs/photos/vqgan.yaml
    $T bench train --config $C --batch 8 --size 64
    $PY bench/pytorch_train_step.py $C --batch 8 --size 64 ;;
  *) echo "usage: $0 first-stage|sample|train" >&2; exit 2 ;;
esac
