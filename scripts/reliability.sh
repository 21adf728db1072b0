#!/usr/bin/env bash
# Produces the reliability figures of docs/RELIABILITY.md with one command:
#   1. the soak test, debug build (`cargo test --test soak -- --nocapture`): ~1000 random network
#      faults through the fault-injecting proxy while the tag moves; its `soak: seed ...` line;
#   2. the hostile-image tests (`cargo test --test hostile -- --nocapture`): the sum of their
#      `hostile inputs: N tried, N rejected, N written outside staging` lines;
#   3. the fuzzers (`fuzz/run.sh SECONDS`, 60 s per target by default): `fuzz <target>: ...` lines;
# then prints a Markdown table of the figures on stdout (progress goes to stderr).
#
#   scripts/reliability.sh [FUZZ_SECONDS]      # FUZZ_SECONDS=0 skips the fuzzers
#
# The soak test reads BOOTSYNC_SOAK_FAULTS (default 1000), BOOTSYNC_SOAK_SEED (replay),
# BOOTSYNC_SOAK_LANES (default 6). Full logs: target/reliability/*.log; the table is also written
# to target/reliability/figures.md. Exit status 0 when every step passed, 1 otherwise.
# Runtime on 2 busy cores: about 3 min soak + 20 s hostile + 5 x FUZZ_SECONDS (+ builds).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

fuzz_seconds=${1:-60}
case $fuzz_seconds in
  '' | *[!0-9]*)
    echo "usage: $0 [FUZZ_SECONDS]" >&2
    exit 2
    ;;
esac
logs=target/reliability
mkdir -p "$logs"
started=$(date +%s)
failed=()

# step NAME LOG COMMAND...: runs COMMAND with its output in LOG; sets step_rc and step_secs.
step() {
  local name=$1 log=$2
  shift 2
  echo "== $name: $*  (log: $log)" >&2
  local t0
  t0=$(date +%s)
  "$@" >"$log" 2>&1
  step_rc=$?
  step_secs=$(($(date +%s) - t0))
  echo "   exit $step_rc after ${step_secs} s" >&2
  if [ "$step_rc" -ne 0 ]; then
    failed+=("$name")
    tail -20 "$log" >&2
  fi
}

field() { # field REGEX LINE: the first capture group of sed REGEX in LINE, or "?"
  local v
  v=$(sed -n "s/$1/\\1/p" <<<"$2")
  echo "${v:-?}"
}

# ---- 1. soak ----
step soak "$logs/soak.log" cargo test --test soak -- --nocapture
soak_secs=$step_secs
soak_line=$(grep -m1 '^soak: seed [0-9]*; faults injected' "$logs/soak.log" || true)
soak_seed=$(field '^soak: seed \([0-9]*\);.*' "$soak_line")
soak_faults=$(field '.*faults injected \([^;]*\);.*' "$soak_line")
soak_syncs=$(field '.*; syncs \([^;]*\);.*' "$soak_line")
soak_published=$(field '.*versions published \([0-9]*\);.*' "$soak_line")
soak_bad=$(field '.*bad publishes \([0-9]*\);.*' "$soak_line")
soak_retry=$(field '.*retry-after honoured \(.*\)$' "$soak_line")
if [ -z "$soak_line" ]; then
  soak_faults="no summary line (see $logs/soak.log)"
fi

# ---- 2. hostile inputs ----
step hostile "$logs/hostile.log" cargo test --test hostile -- --nocapture
hostile_secs=$step_secs
hostile=$(grep -o 'hostile inputs: [0-9]* tried, [0-9]* rejected, [0-9]* written outside staging' \
  "$logs/hostile.log" | awk '{t += $3; r += $5; o += $7; n++}
    END {printf "%d tried, %d rejected, %d written outside staging (%d tallies)", t, r, o, n}')
hostile_tests=$(grep -m1 -o '[0-9]* passed; [0-9]* failed' "$logs/hostile.log" || echo "no test result")

# ---- 3. fuzzers ----
fuzz_rows=""
fuzz_total=0
fuzz_secs=0
if [ "$fuzz_seconds" -gt 0 ]; then
  step fuzz "$logs/fuzz.log" fuzz/run.sh "$fuzz_seconds"
  fuzz_secs=$step_secs
  while IFS= read -r l; do
    target=$(field '^fuzz \([^:]*\):.*' "$l")
    rest=${l#fuzz "$target": }
    execs=$(field '^\([0-9]*\) executions.*' "$rest")
    case $execs in '' | *[!0-9]*) ;; *) fuzz_total=$((fuzz_total + execs)) ;; esac
    fuzz_rows+="| fuzz \`$target\` | \`fuzz/run.sh $fuzz_seconds\` | $rest | |"$'\n'
  done < <(grep '^fuzz [a-z_]*: ' "$logs/fuzz.log" || true)
  [ -n "$fuzz_rows" ] || fuzz_rows="| fuzz | \`fuzz/run.sh $fuzz_seconds\` | no result lines (see $logs/fuzz.log) | |"$'\n'
fi

# ---- the table ----
total=$(($(date +%s) - started))
cpu=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | sed 's/^model name[[:space:]]*: //')
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then rev="$rev + uncommitted changes"; fi
if [ ${#failed[@]} -eq 0 ]; then verdict="all passed"; else verdict="FAILED: ${failed[*]}"; fi
{
  echo "Run $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) cores (${cpu:-unknown CPU}), $(uname -sr);"
  echo "bootsync $rev; $(rustc -V 2>/dev/null); \`scripts/reliability.sh $fuzz_seconds\` took $((total / 60)) min $((total % 60)) s."
  echo
  echo "| figure | command | result | time |"
  echo "| --- | --- | --- | --- |"
  echo "| soak: faults injected | \`cargo test --test soak\` (debug build) | $soak_faults | ${soak_secs} s |"
  echo "| soak: syncs | | $soak_syncs | |"
  echo "| soak: versions published | | $soak_published | |"
  echo "| soak: bad publishes | | **$soak_bad** | |"
  echo "| soak: Retry-After honoured | | $soak_retry | |"
  echo "| soak: seed | | $soak_seed (replay: \`BOOTSYNC_SOAK_SEED=$soak_seed\`) | |"
  echo "| hostile inputs | \`cargo test --test hostile\` | ${hostile:-?}; ${hostile_tests} | ${hostile_secs} s |"
  if [ "$fuzz_seconds" -gt 0 ]; then
    printf '%s' "$fuzz_rows"
    echo "| fuzz: total | | $fuzz_total executions | ${fuzz_secs} s |"
  fi
  echo "| verdict | | $verdict | $((total / 60)) min $((total % 60)) s |"
} | tee "$logs/figures.md"

[ ${#failed[@]} -eq 0 ]
