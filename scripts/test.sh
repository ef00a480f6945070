#!/usr/bin/env bash
# The project's test command: fetch the real checkpoints (a fast checksum pass when they are
# already in models/), run every test in the workspace, and compile every bench. Extra arguments
# go to cargo test, e.g. `scripts/test.sh -p embedfleet-models` or `scripts/test.sh -- --nocapture`.
#
# Tests build in the release profile: the real-weight tests run full BERT/MPNet forwards, and the
# benches need the same optimised dependencies, so one build serves both (on 2 cores a second,
# debug build of candle would cost CI several minutes for nothing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/fetch-models.sh
# Every test runs on a current nats-server (fetched into tools/ when the machine has only an old
# one); the 2.9 compatibility of the code is checked by tests that ask for the system's server.
EMBEDFLEET_NATS_SERVER="$(bash scripts/fetch-nats-server.sh)"
export EMBEDFLEET_NATS_SERVER
"$EMBEDFLEET_NATS_SERVER" --version
# The Helm chart: rendered by the real Helm engine and validated (seconds; a venv under target/).
bash scripts/chart-test.sh
cargo test --release --workspace "$@"
cargo bench --workspace --no-run
# The fleet perf harness on the small tier (a fleet it starts, real minilm), gate on: a severe
# regression against benches/baseline.json exits 3 and fails the run (docs/benchmarks.md#ci).
# Only on a whole-workspace run: a filtered one (`-p ...`) may not have built the binary.
if [ $# -eq 0 ]; then
  start=$SECONDS
  EMBEDFLEET_MODELS_DIR="$PWD/models" HF_HUB_OFFLINE=1 \
    target/release/embedfleet bench run --tier small --out target/bench-fleet
  echo "bench run (small tier, gate on): $((SECONDS - start))s"
fi
# FuseMoE's CUDA path must keep compiling on machines without CUDA (cudarc loads the driver at
# run time). The whole CUDA build (candle's CUDA backend and the GPU test binaries,
# scripts/cuda-build.sh) is not part of this command: it takes ~22 min on 2 cores, more than the
# rest of CI's build; scripts/gpu-check.sh prepare runs it before a GPU check.
cargo build --release -p embedfleet-fusion --features cuda
