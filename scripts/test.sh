#!/usr/bin/env bash
# The project's test command: fetch the real checkpoints (a fast checksum pass when they are
# already in models/), then run every test in the workspace. Extra arguments go to cargo test,
# e.g. `scripts/test.sh -p embedfleet-models` or `scripts/test.sh -- --nocapture`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/fetch-models.sh
cargo test --workspace --all-targets "$@"
