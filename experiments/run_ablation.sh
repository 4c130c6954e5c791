#!/usr/bin/env bash
# The paper's ablation (fixed alpha; learned alpha; learned alpha, l and u) on this data,
# on the default (affine) grid, paired by seed, three fine-tuning epochs from float_s0:
#   uniform_{w2a2_p99,w4a4_p999}_bfix_ep3_s{0,1,2}    straight-through, bounds fixed at
#                                                      their first-batch values
#   dsq_..._afix_bfix_ep3_s{0,1,2}                     DSQ, alpha fixed at 0.2, bounds fixed
#   dsq_..._a1000_bfix_ep3_s{0,1,2}                    DSQ, alpha learned at 1000x --lr
#                                                      (RESULTS.md, "Why alpha stays at 0.2")
#   dsq_..._a1000_ep3_s{0,1,2}                         DSQ, alpha (1000x), l and u learned
#   dsq_..._a1_ep3_s{0,1,2}                            DSQ, alpha (1x), l and u learned
#   float_ft_ep3_s{0,1,2}                              the float control: float_s0 fine-tuned
#                                                      on the same schedule, unquantized
# Every alpha is projected into the kernels' range after each step (dsq_ext.project_alpha_);
# a1000 records written before that (code f6eb9d5) let the weights' alpha leave (0, 0.5].
# 33 runs of three epochs: hours on 2 CPU cores, minutes on a GPU (add --gpu 0 to COMMON
# there). Each finished run is recorded in experiments/results/NAME.json.
#
#   experiments/run_ablation.sh          # all, skipping finished ones
#   experiments/run_ablation.sh NAME ... # only those
#   experiments/run_ablation.sh --list
cd "$(dirname "$0")/.."
source experiments/runs_lib.sh

declare -A RECIPE=(
    [w2a2_p99]="--quan_bit 2 --quantize_input --act-percentile 99"
    [w4a4_p999]="--quan_bit 4 --quantize_input --act-percentile 99.9"
)
EP3=(--epochs 3 "${FT[@]}")

for s in 0 1 2; do
    add float_ft_ep3_s$s "${EP3[*]} --seed $s"
    for r in w2a2_p99 w4a4_p999; do
        q="${RECIPE[$r]} ${EP3[*]} --seed $s"
        add uniform_${r}_bfix_ep3_s$s   "-q uniform --bounds-lr-scale 0 $q"
        add dsq_${r}_afix_bfix_ep3_s$s  "-q DSQ --alpha-lr-scale 0 --bounds-lr-scale 0 $q"
        add dsq_${r}_a1000_bfix_ep3_s$s "-q DSQ --alpha-lr-scale 1000 --bounds-lr-scale 0 $q"
        add dsq_${r}_a1000_ep3_s$s      "-q DSQ --alpha-lr-scale 1000 $q"
        add dsq_${r}_a1_ep3_s$s         "-q DSQ --alpha-lr-scale 1 $q"
    done
done

runs_main "$@"
