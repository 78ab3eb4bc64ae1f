#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 40) and fails on the first crash.
#   fuzz/run.sh [SECONDS]            seeds from fuzz/corpus/<target>; new finds go to fuzz/target/finds
#   MERGE=1 fuzz/run.sh [SECONDS]    then folds the finds into fuzz/corpus/<target> (minimised)
#   SEED=1 RUNS=N fuzz/run.sh [SECONDS]
#                                    a fixed seed and a count of inputs, SECONDS only as a cap: the
#                                    same inputs on every machine (CI's regression gate; exploring
#                                    is for the default, randomly seeded runs)
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). The stable toolchain builds the
# targets with RUSTC_BOOTSTRAP=1 (libFuzzer and the address sanitizer need -Z flags).
# A crash leaves its input in fuzz/artifacts/<target>/; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/crash-...
set -euo pipefail
seconds=${1:-40}
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
targets=(json_ping config headers frames relay proxy_protocol)
declare -A max_len=([json_ping]=20000 [config]=4096 [headers]=4096 [frames]=16384 [relay]=8192 [proxy_protocol]=2100)
limits=(-max_total_time="$seconds")
[ -n "${SEED:-}" ] && limits+=(-seed="$SEED")
[ -n "${RUNS:-}" ] && limits+=(-runs="$RUNS")

cargo fuzz build
for target in "${targets[@]}"; do
    finds=target/finds/$target
    mkdir -p "$finds" "corpus/$target"
    echo "=== fuzz $target: ${limits[*]}"
    cargo fuzz run "$target" "$finds" "corpus/$target" -- \
        "${limits[@]}" -max_len="${max_len[$target]}" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 2>&1 | grep -E --line-buffered '^(#[0-9]+.*(DONE|pulse)|==|SUMMARY|stat::number_of_executed_units|stat::peak_rss|Done|INFO: seed)|panicked|ERROR|crash-|artifact' \
        || { [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "fuzz target $target FAILED (see fuzz/artifacts/$target)"; exit 1; }; }
    if [ "${MERGE:-0}" = 1 ]; then
        cp -n "$finds"/* "corpus/$target"/ 2>/dev/null || true
        cargo fuzz cmin "$target" "corpus/$target" -- -max_len="${max_len[$target]}" >/dev/null 2>&1
        echo "corpus/$target: $(ls "corpus/$target" | wc -l) inputs, $(du -sh "corpus/$target" | cut -f1)"
    fi
done
echo "fuzzing: every target ran (${limits[*]}) without a crash"
