# The shared header and run machinery of the study scripts (run_study.sh,
# run_investigation.sh, run_percentile.sh, ...). A script does
#     cd "$(dirname "$0")/.." && source experiments/runs_lib.sh
#     add NAME "extra train.py arguments" ...
#     runs_main "$@"
# runs_main with no argument runs every unfinished run in order, NAME ... reruns
# those, --list prints the commands. Each run goes through train.py exactly as a user
# would call it, with its output in $RUNS/NAME/ (TensorBoard events, checkpoints,
# train.log, command.txt) and $RUNS/NAME/done holding "rc=<exit status> wall_s=<seconds>".
# Environment: PYTHON (default .venv/bin/python), DATA (default data/fashion-mnist,
# `make data` writes it), RUNS (default runs).
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-data/fashion-mnist}
RUNS=${RUNS:-runs}
export PYTHONUNBUFFERED=1  # train.log fills as the run goes, not in 4 KiB blocks

# The same model, input size, batch and loader workers for every run.
COMMON=(-a resnet18 --image-size 32 -b 128 -j 2)
# Every quantized run fine-tunes run_study.sh's float_s0 at lr 0.01. -p 20 (print every
# 20 steps) gives make_results.py a finer training curve than the one-point-per-epoch
# TensorBoard events; it changes nothing else.
FLOAT_CKPT="$RUNS/float_s0/model_best.pth.tar"
FT=(--lr 0.01 --init-from "$FLOAT_CKPT" -p 20)

# name -> extra train.py arguments; order = order of execution.
NAMES=()
declare -A ARGS
add() { NAMES+=("$1"); ARGS[$1]="$2"; }

command_of() {
    local name=$1
    # shellcheck disable=SC2086  # ARGS values are word lists
    echo "$PYTHON" train.py "${COMMON[@]}" ${ARGS[$name]} --log_path "$RUNS/$name" "$DATA"
}

run() {
    local name=$1 cmd start rc
    cmd=$(command_of "$name")
    mkdir -p "$RUNS/$name"
    echo "$cmd" > "$RUNS/$name/command.txt"
    echo "[$(date -u +%H:%M:%S)] $name: $cmd"
    start=$(date +%s)
    rc=0
    # shellcheck disable=SC2086
    $cmd > "$RUNS/$name/train.log" 2>&1 || rc=$?
    echo "rc=$rc wall_s=$(( $(date +%s) - start ))" > "$RUNS/$name/done"
    # The committable record (experiments/results/NAME.json): run directories are not kept.
    [[ $rc == 0 ]] && "$PYTHON" experiments/record_run.py "$RUNS/$name" || true
    # the last "best Acc@1": the first one printed is the --init-from checkpoint's
    echo "[$(date -u +%H:%M:%S)] $name: $(cat "$RUNS/$name/done"); $(grep -o 'best Acc@1 [0-9.]*' "$RUNS/$name/train.log" | tail -n 1 || true)"
    return "$rc"
}

runs_main() {
if [[ ${1:-} == --list ]]; then
    for name in "${NAMES[@]}"; do echo "$name: $(command_of "$name")"; done
    exit 0
fi

if [[ $# -gt 0 ]]; then
    for name in "$@"; do
        [[ -n ${ARGS[$name]+x} ]] || { echo "unknown run '$name'; see --list" >&2; exit 2; }
        run "$name"
    done
    exit 0
fi

for name in "${NAMES[@]}"; do
    if grep -qs '^rc=0 ' "$RUNS/$name/done"; then
        echo "$name: finished already ($(cat "$RUNS/$name/done")), skipped"
        continue
    fi
    run "$name"
done
}
