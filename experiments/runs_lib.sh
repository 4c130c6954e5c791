# Shared by run_study.sh and run_investigation.sh, which define PYTHON, DATA, RUNS,
# COMMON, NAMES and ARGS (name -> extra train.py arguments) and then source this file
# with their own command-line arguments: no argument runs every unfinished run in
# order, NAME ... reruns those, --list prints the commands.

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
    # the last "best Acc@1": the first one printed is the --init-from checkpoint's
    echo "[$(date -u +%H:%M:%S)] $name: $(cat "$RUNS/$name/done"); $(grep -o 'best Acc@1 [0-9.]*' "$RUNS/$name/train.log" | tail -n 1 || true)"
    return "$rc"
}

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
