#!/usr/bin/env bash
# The quantization grid (train.py --grid): free (levels at lower + k*Delta, any real
# lower; the grid of every earlier run) against the grids that integer runtimes and
# ONNX represent exactly (affine: an integer zero point; symmetric: zero point 0 for
# the weights, affine activations), on the recipe of run_percentile.sh, paired by seed:
#   dsq_w4a4_p999_{free,affine,symmetric}_s{0,1}   W4A4, activation bounds from p99.9
#   dsq_w2a2_p99_{free,affine,symmetric}_s{0,1}    W2A2, activation bounds from p99
#   dsq_w8a8_affine_s0                             W8A8 (the 8-bit export)
# one fine-tuning epoch each from run_study.sh's float_s0.
#
#   experiments/run_grid.sh          # all, skipping finished ones
#   experiments/run_grid.sh NAME ... # only those
#   experiments/run_grid.sh --list
cd "$(dirname "$0")/.."
source experiments/runs_lib.sh

W2A2=(--quan_bit 2 --quantize_input --act-percentile 99)
W4A4=(--quan_bit 4 --quantize_input --act-percentile 99.9)

for s in 0 1; do
    for grid in free affine symmetric; do
        # free runs name --grid free: the default is what this study chooses
        g="--grid $grid"
        add dsq_w4a4_p999_${grid}_s$s "-q DSQ ${W4A4[*]} $g --epochs 1 ${FT[*]} --seed $s"
        add dsq_w2a2_p99_${grid}_s$s  "-q DSQ ${W2A2[*]} $g --epochs 1 ${FT[*]} --seed $s"
    done
done
add dsq_w8a8_affine_s0 "-q DSQ --quan_bit 8 --quantize_input --grid affine --epochs 1 ${FT[*]} --seed 0"

runs_main "$@"
