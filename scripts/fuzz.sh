#!/bin/sh
# A long fuzzing campaign: every atheris harness in tests/fuzz for SECONDS each (default 60).
#
#   scripts/fuzz.sh [SECONDS]
#
# FUZZ_DIR (default /var/tmp/wiregate-fuzz) keeps each target's corpus between
# campaigns and the inputs that broke it (TARGET/artifacts/crash-*); FUZZ_TARGETS
# narrows the list. Prints executions, rate, coverage, corpus size and this run's
# findings per target (a harness stops at its first); exits 1 if any found something
# (replay one with `.venv/bin/python tests/fuzz/fuzz_TARGET.py FILE`).
set -eu
cd "$(dirname "$0")/.."

seconds=${1:-60}
work=${FUZZ_DIR:-/var/tmp/wiregate-fuzz}
targets=${FUZZ_TARGETS:-"stun relay_control tickets uapi policy agentmsg"}
status=0

stat_of() {  # stat_of NAME LOG: a libFuzzer final statistic, or "-"
    value=$(sed -n "s/^stat::$1: *//p" "$2" | tail -n 1)
    echo "${value:--}"
}

printf '%-14s %12s %8s %6s %7s %s\n' target executions exec/s cov corpus findings
for target in $targets; do
    dir="$work/$target"
    mkdir -p "$dir/corpus" "$dir/artifacts"
    log="$dir/last.log"
    touch "$dir/.started"
    if ! .venv/bin/python "tests/fuzz/fuzz_$target.py" -max_total_time="$seconds" \
        -print_final_stats=1 -rss_limit_mb=2048 -artifact_prefix="$dir/artifacts/" \
        "$dir/corpus" >"$log" 2>&1; then
        status=1
    fi
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 | cut -d' ' -f2)
    printf '%-14s %12s %8s %6s %7s %s\n' "$target" \
        "$(stat_of number_of_executed_units "$log")" "$(stat_of average_exec_per_sec "$log")" \
        "${cov:--}" "$(find "$dir/corpus" -type f | wc -l)" \
        "$(find "$dir/artifacts" -type f -newer "$dir/.started" | wc -l)"
done
[ "$status" -eq 0 ] || echo "fuzz: a harness failed; see $work/TARGET/last.log and artifacts/" >&2
exit "$status"
