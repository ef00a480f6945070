#!/usr/bin/env bash
# Every CPU benchmark of docs/benchmarks.md in one run on one machine, so the page's figures
# hold together: every criterion group, the fleet harness (small and medium tiers, cold and
# warm, closed and open loop), the capacity sweep, and the side-by-side against
# sentence-transformers. Run it on a quiet machine (nothing else building); it takes ~30 min
# on 2 cores.
#
#   scripts/bench-all.sh [OUT]        (default target/bench-all)
#
# Writes OUT/machine.txt (CPU, cores, load, date, commit), OUT/criterion.md (every criterion
# id's median and 95 % interval, from target/criterion), the harness's and the sweep's own
# reports under OUT/, and OUT/side-by-side.txt when the reference environment exists
# (.venv-ref, see scripts/bench-models-side-by-side.sh). Progress goes to stderr.
#
# Profile: the `ci` profile (release optimisation without thin LTO), the build CI and the
# tests already make; BENCH_PROFILE=release to measure the shipped profile instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-target/bench-all}
PROFILE=${BENCH_PROFILE:-ci}
mkdir -p "$OUT"
step() { echo "== $(date -u +%H:%M:%S) $*" >&2; }

bash scripts/fetch-models.sh >&2
EMBEDFLEET_NATS_SERVER="$(bash scripts/fetch-nats-server.sh)"
export EMBEDFLEET_NATS_SERVER EMBEDFLEET_MODELS_DIR="$PWD/models" HF_HUB_OFFLINE=1

step "build ($PROFILE profile)"
# What scripts/test.sh builds (test and bench targets unify the same features), so after a test
# run this builds nothing; a plain `cargo build -p embedfleet-cli` would rebuild dependencies
# with other features.
cargo test --profile "$PROFILE" --workspace --no-run >&2
cargo bench --profile "$PROFILE" --workspace --no-run >&2
BIN=target/$PROFILE/embedfleet

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (uncommitted changes)')"
  echo "cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1)"
  echo "cores: $(nproc)"
  echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "profile: $PROFILE"
  echo "rustc: $(rustc --version)"
} | tee "$OUT/machine.txt" >&2

step "criterion: every group"
rm -rf target/criterion
cargo bench --profile "$PROFILE" --workspace >&2
python3 scripts/criterion-summary.py target/criterion > "$OUT/criterion.md"

step "fleet harness: small tier"
"$BIN" bench run --tier small --rate 5,20 --out "$OUT/small" --no-gate >&2
step "fleet harness: medium tier"
"$BIN" bench run --tier medium --rate 2,5 --out "$OUT/medium" --no-gate >&2
step "capacity sweep (medium tier, p99 target 1 s)"
"$BIN" bench sweep --tier medium --target-p99-ms 1000 --start 2 --factor 1.5 \
  --step-seconds 15 --target-load 100 --out "$OUT/sweep" >&2

if [ -x .venv-ref/bin/python ] || [ -n "${PYTHON:-}" ]; then
  step "side by side: sentence-transformers"
  bash scripts/bench-models-side-by-side.sh > "$OUT/side-by-side.txt"
  cat "$OUT/side-by-side.txt" >&2
else
  step "no .venv-ref: side-by-side skipped"
fi
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt" >&2
step "done: $OUT"
