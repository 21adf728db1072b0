#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 20: the bounded CI run; overnight: 28800)
# from the committed seeds, and prints one line per target: executions and findings.
# A crash leaves its input in fuzz/artifacts/<target>/ and makes this script fail.
#   fuzz/run.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(manifest layer kernel initramfs uki signature)
# cargo-fuzz needs unstable rustc flags; this toolchain is stable.
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O >/dev/null
failed=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log=$(mktemp)
  if cargo fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    result="0 findings"
  else
    result="FINDING (see fuzz/artifacts/$t/)"
    failed=1
    tail -30 "$log"
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
  echo "fuzz $t: $execs executions in ${seconds}s, $result"
  rm -f "$log"
done
exit $failed
