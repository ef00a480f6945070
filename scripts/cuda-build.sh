#!/usr/bin/env bash
# Builds embedfleet with CUDA (`--features cuda`) on a machine with no CUDA installed: the tools
# come from PyPI (scripts/cuda-toolkit.sh), the build goes to target/cuda so it never disturbs the
# CPU build in target/. Builds the `embedfleet` binary and the GPU test binaries (the parity tests
# of the models and of FuseMoE), so that a GPU machine with no Rust toolchain can run them.
#
#   scripts/cuda-build.sh                 # compute capability 9.0 (H100, H200)
#   CUDA_COMPUTE_CAP=80 scripts/cuda-build.sh   # A100, A10...: PTX for 8.0 (JIT-compiled on 8.x)
#   CUDA_BUILD_PROFILE=ci scripts/cuda-build.sh # what CI compiles: the same code, no LTO
#
# Prints, last, the paths of the built binaries (one a line) for scripts/gpu-check.sh to carry.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo fetch --quiet
CUDA_HOME="$(bash scripts/cuda-toolkit.sh)"
export CUDA_HOME CUDA_ROOT="$CUDA_HOME" PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
# nvcc runs one process per kernel file; two at a time is what a 2-core CI machine can take.
export NVCC_THREADS="${NVCC_THREADS:-2}"
# `release` for binaries that are carried to a GPU and timed; CI only needs to know it compiles.
profile="${CUDA_BUILD_PROFILE:-release}"
# The same features reach every shared crate in both steps, so they share one build of candle
# and its kernels (the benches' `cuda` adds nothing the CLI's does not).
features=(--features embedfleet-cli/cuda,embedfleet-benches/cuda)

start=$SECONDS
cargo build --profile "$profile" -p embedfleet-cli --features embedfleet-cli/cuda
# The GPU test and bench binaries (tests/cuda_parity.rs of the models and of FuseMoE,
# benches/gpu.rs), in one invocation so every crate sees the same features. The bench binary is
# built in test mode: run it with `--bench` to measure.
cargo test --profile "$profile" -p embedfleet-models -p embedfleet-fusion -p embedfleet-benches \
  -p embedfleet-cli "${features[@]}" --test cuda_parity --bench gpu --no-run \
  --message-format=json-render-diagnostics \
  | python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["profile"]["test"]:
        print(msg["executable"])
' > "$CARGO_TARGET_DIR/gpu-binaries.txt"
list="$CARGO_TARGET_DIR/gpu-binaries.txt"
echo "cuda-build: compute capability $CUDA_COMPUTE_CAP, profile $profile, $((SECONDS - start))s" >&2
echo "$CARGO_TARGET_DIR/$profile/embedfleet"
cat "$list"
