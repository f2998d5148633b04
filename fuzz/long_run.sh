#!/usr/bin/env bash
# Long atheris runs, one target after another: fuzz/long_run.sh SECONDS TARGET...
#
# Each target gets SECONDS of wall-clock fuzzing at nice 19.  libFuzzer stops at
# the first crash, so the run is restarted (with everything found so far) until
# the time is used up, at most 20 times; every crash is kept in fuzz/artifacts/.
# New inputs go to a scratch directory and are merged into fuzz/corpus/TARGET
# with -merge=1 at the end, which keeps only inputs that add coverage.
# Logs: $FUZZ_WORK/logs/TARGET.log (FUZZ_WORK defaults to /tmp/bsd_ovpn_fuzz).
set -u
cd "$(dirname "$0")/.."
dur=$1; shift
work=${FUZZ_WORK:-/tmp/bsd_ovpn_fuzz}
mkdir -p "$work/logs"
for t in "$@"; do
    new=$(mktemp -d "$work/$t.XXXX")
    log=$work/logs/$t.log
    : > "$log"
    start=$(date +%s); end=$((start + dur)); runs=0
    while [ $(( end - $(date +%s) )) -gt 5 ] && [ $runs -lt 20 ]; do
        runs=$((runs + 1))
        left=$(( end - $(date +%s) ))
        echo "=== start $runs, ${left}s left" >> "$log"
        nice -n 19 python3 fuzz/run_atheris.py "$t" -max_total_time=$left -print_final_stats=1 \
            -timeout=30 "$new" "fuzz/corpus/$t" >> "$log" 2>&1
        echo "=== exit $?" >> "$log"
    done
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s+=$2} END {print s+0}')
    nice -n 19 python3 fuzz/run_atheris.py "$t" -merge=1 "fuzz/corpus/$t" "$new" >> "$log" 2>&1
    echo "SUMMARY $t seconds=$(( $(date +%s) - start )) starts=$runs execs=$execs" \
         "crashes=$(grep -c 'Uncaught Python exception\|libFuzzer: out-of-memory\|libFuzzer: timeout' "$log")" \
         | tee -a "$log" >> "$work/summary.txt"
    rm -rf "$new"
done
