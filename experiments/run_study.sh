#!/usr/bin/env bash
# Fashion-MNIST study: float vs uniform (straight-through) vs DSQ at W4A4, W3A3, W2A2.
#
#   experiments/run_study.sh              # every run of the study, in order, skipping finished ones
#   experiments/run_study.sh NAME ...     # only the named runs (e.g. dsq_w2a2_s0), even if finished
#   experiments/run_study.sh --list       # the names and their train.py commands
#
# Each run goes through train.py exactly as a user would call it, with its output in
# runs/NAME/ (TensorBoard events, checkpoint.pth.tar, model_best.pth.tar, train.log) and
# runs/NAME/done holding "rc=<exit status> wall_s=<seconds>". Then
#   .venv/bin/python experiments/make_results.py
# reads runs/ and writes the tables and figures.
#
# The run machinery is experiments/runs_lib.sh.

cd "$(dirname "$0")/.."
source experiments/runs_lib.sh
# These runs predate the grid option, when the free grid was the only one: each names
# --grid free, so that it reproduces under today's default (affine).

# Fine-tuning: one epoch of runs_lib.sh's FT, the same for both methods; float_s0 first.
FINETUNE=(--epochs 1 "${FT[@]}")

add float_s0        "--epochs 2 --lr 0.1 --seed 0 -p 100"
add uniform_w2a2_s0 "-q uniform --grid free --quan_bit 2 --quantize_input ${FINETUNE[*]} --seed 0"
add dsq_w2a2_s0     "-q DSQ --grid free --quan_bit 2 --quantize_input ${FINETUNE[*]} --seed 0"
add uniform_w4a4_s0 "-q uniform --grid free --quan_bit 4 --quantize_input ${FINETUNE[*]} --seed 0"
add dsq_w4a4_s0     "-q DSQ --grid free --quan_bit 4 --quantize_input ${FINETUNE[*]} --seed 0"
add uniform_w2a2_s1 "-q uniform --grid free --quan_bit 2 --quantize_input ${FINETUNE[*]} --seed 1"
add dsq_w2a2_s1     "-q DSQ --grid free --quan_bit 2 --quantize_input ${FINETUNE[*]} --seed 1"
add uniform_w3a3_s0 "-q uniform --grid free --quan_bit 3 --quantize_input ${FINETUNE[*]} --seed 0"
add dsq_w3a3_s0     "-q DSQ --grid free --quan_bit 3 --quantize_input ${FINETUNE[*]} --seed 0"
# Control: the float model given the same extra fine-tuning epoch, unquantized, so that
# the quantized rows are compared with a float model of the same total training.
add float_ft1_s0    "${FINETUNE[*]} --seed 0"

runs_main "$@"
