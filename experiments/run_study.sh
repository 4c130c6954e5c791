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
# Environment: PYTHON (default .venv/bin/python), DATA (default data/fashion-mnist,
# `make data` writes it), RUNS (default runs).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-data/fashion-mnist}
RUNS=${RUNS:-runs}
export PYTHONUNBUFFERED=1  # train.log fills as the run goes, not in 4 KiB blocks

# The same model, input size, batch and loader workers for every run.
COMMON=(-a resnet18 --image-size 32 -b 128 -j 2)
FLOAT_CKPT="$RUNS/float_s0/model_best.pth.tar"
# Fine-tuning: one epoch at lr 0.01 from the float checkpoint, the same for both methods.
# -p 20 (print every 20 steps) gives make_results.py a finer training curve than the
# one-point-per-epoch TensorBoard events; it changes nothing else.
FINETUNE=(--epochs 1 --lr 0.01 --init-from "$FLOAT_CKPT" -p 20)

# name -> extra train.py arguments. Order = order of execution (the float run must be first).
NAMES=()
declare -A ARGS
add() { NAMES+=("$1"); ARGS[$1]="$2"; }

add float_s0        "--epochs 2 --lr 0.1 --seed 0 -p 100"
add uniform_w2a2_s0 "-q uniform --quan_bit 2 --quantize_input ${FINETUNE[*]} --seed 0"
add dsq_w2a2_s0     "-q DSQ --quan_bit 2 --quantize_input ${FINETUNE[*]} --seed 0"
add uniform_w4a4_s0 "-q uniform --quan_bit 4 --quantize_input ${FINETUNE[*]} --seed 0"
add dsq_w4a4_s0     "-q DSQ --quan_bit 4 --quantize_input ${FINETUNE[*]} --seed 0"
add uniform_w2a2_s1 "-q uniform --quan_bit 2 --quantize_input ${FINETUNE[*]} --seed 1"
add dsq_w2a2_s1     "-q DSQ --quan_bit 2 --quantize_input ${FINETUNE[*]} --seed 1"
add uniform_w3a3_s0 "-q uniform --quan_bit 3 --quantize_input ${FINETUNE[*]} --seed 0"
add dsq_w3a3_s0     "-q DSQ --quan_bit 3 --quantize_input ${FINETUNE[*]} --seed 0"
# Control: the float model given the same extra fine-tuning epoch, unquantized, so that
# the quantized rows are compared with a float model of the same total training.
add float_ft1_s0    "${FINETUNE[*]} --seed 0"

source experiments/runs_lib.sh
