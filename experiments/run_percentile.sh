#!/usr/bin/env bash
# Follow-up 2: activation bounds from a percentile of the first batch instead of its
# min/max (train.py --act-percentile), the main source of the seed-to-seed spread that
# run_study.sh and run_investigation.sh found at W2A2. The percentile per bit width is
# the candidate with the lowest quantization error of the float model's first-batch
# activations (experiments/act_clip.py, 3 seeds): 99 at 2 bits, 99.9 at 4 bits.
#   {uniform,dsq}_w2a2_p99_s{0..4}      one fine-tuning epoch, 5 seeds
#   {uniform,dsq}_w4a4_p999_s0          one fine-tuning epoch
#   {uniform,dsq}_w2a2_p99_ep3_s{0,1,2} three fine-tuning epochs (lr 0.01 throughout)
#   {uniform,dsq}_w4a4_p999_s{1,2}      two more W4A4 seeds, and
#   float_ft1_s{1,2}                    the float control (run_study.sh's recipe) at those seeds
#
#   experiments/run_percentile.sh          # all, skipping finished ones
#   experiments/run_percentile.sh NAME ... # only those
#   experiments/run_percentile.sh --list
#
# Same conventions as run_study.sh (needs its float_s0 run); then run make_results.py.

cd "$(dirname "$0")/.."
source experiments/runs_lib.sh
# These runs predate the grid option, when the free grid was the only one: each names
# --grid free, so that it reproduces under today's default (affine).

W2A2=(--quan_bit 2 --quantize_input --act-percentile 99)
W4A4=(--quan_bit 4 --quantize_input --act-percentile 99.9)

for s in 0 1 2; do
    add uniform_w2a2_p99_s$s "-q uniform --grid free ${W2A2[*]} --epochs 1 ${FT[*]} --seed $s"
    add dsq_w2a2_p99_s$s     "-q DSQ --grid free ${W2A2[*]} --epochs 1 ${FT[*]} --seed $s"
done
add uniform_w4a4_p999_s0 "-q uniform --grid free ${W4A4[*]} --epochs 1 ${FT[*]} --seed 0"
add dsq_w4a4_p999_s0     "-q DSQ --grid free ${W4A4[*]} --epochs 1 ${FT[*]} --seed 0"
for s in 3 4; do
    add uniform_w2a2_p99_s$s "-q uniform --grid free ${W2A2[*]} --epochs 1 ${FT[*]} --seed $s"
    add dsq_w2a2_p99_s$s     "-q DSQ --grid free ${W2A2[*]} --epochs 1 ${FT[*]} --seed $s"
done
for s in 0 1; do
    add uniform_w2a2_p99_ep3_s$s "-q uniform --grid free ${W2A2[*]} --epochs 3 ${FT[*]} --seed $s"
    add dsq_w2a2_p99_ep3_s$s     "-q DSQ --grid free ${W2A2[*]} --epochs 3 ${FT[*]} --seed $s"
done

# Added after the runs above: more seeds for the 4-bit comparison with float, and a third
# seed of the three-epoch pair.
FINETUNE_FLOAT=(--epochs 1 ${FT[*]})
for s in 1 2; do
    add uniform_w4a4_p999_s$s "-q uniform --grid free ${W4A4[*]} --epochs 1 ${FT[*]} --seed $s"
    add dsq_w4a4_p999_s$s     "-q DSQ --grid free ${W4A4[*]} --epochs 1 ${FT[*]} --seed $s"
    add float_ft1_s$s         "${FINETUNE_FLOAT[*]} --seed $s"
done
add uniform_w2a2_p99_ep3_s2 "-q uniform --grid free ${W2A2[*]} --epochs 3 ${FT[*]} --seed 2"
add dsq_w2a2_p99_ep3_s2     "-q DSQ --grid free ${W2A2[*]} --epochs 3 ${FT[*]} --seed 2"

runs_main "$@"
