#!/usr/bin/env bash
# The project's test command: fetch the real checkpoints (a fast checksum pass when they are
# already in models/), run every test in the workspace, and compile every bench. Extra arguments
# go to cargo test, e.g. `scripts/test.sh -p embedfleet-models` or `scripts/test.sh -- --nocapture`.
#
# Tests build in the `ci` profile (Cargo.toml): release's optimisation, because the real-weight
# tests run full BERT/MPNet/Whisper forwards and the benches need the same optimised dependencies
# (one build serves both), without release's thin LTO, which re-optimised all of candle for each
# of the ~65 linked test binaries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/fetch-models.sh
# The Python example is run against a fleet by a test (tests/mixed_media_fleet.rs): nats-py.
python3 -m pip install --quiet --disable-pip-version-check -r examples/python/requirements.txt
# Every test runs on a current nats-server (fetched into tools/ when the machine has only an old
# one); the 2.9 compatibility of the code is checked by tests that ask for the system's server.
EMBEDFLEET_NATS_SERVER="$(bash scripts/fetch-nats-server.sh)"
export EMBEDFLEET_NATS_SERVER
"$EMBEDFLEET_NATS_SERVER" --version
# The Helm chart: rendered by the real Helm engine and validated (seconds; a venv under target/).
bash scripts/chart-test.sh
cargo test --profile ci --workspace "$@"
cargo bench --profile ci --workspace --no-run
# The fleet perf harness on the small tier (a fleet it starts, real minilm), gate on: a severe
# regression against benches/baseline.json exits 3 and fails the run (docs/benchmarks.md#ci).
# Only on a whole-workspace run: a filtered one (`-p ...`) may not have built the binary.
if [ $# -eq 0 ]; then
  start=$SECONDS
  EMBEDFLEET_MODELS_DIR="$PWD/models" HF_HUB_OFFLINE=1 \
    target/ci/embedfleet bench run --tier small --out target/bench-fleet
  echo "bench run (small tier, gate on): $((SECONDS - start))s"
fi
# The CUDA build must keep compiling on machines without CUDA or a GPU: candle's CUDA backend
# and kernels (nvcc from PyPI, scripts/cuda-toolkit.sh), FuseMoE's cudarc path, the `embedfleet`
# binary and the GPU test binaries that scripts/gpu-check.sh carries to a GPU machine. Compile
# only (nothing here can run them); in target/cuda, beside the CPU build.
if [ $# -eq 0 ]; then
  start=$SECONDS
  CUDA_BUILD_PROFILE=ci bash scripts/cuda-build.sh >/dev/null
  echo "cuda build (compile only): $((SECONDS - start))s"
fi
