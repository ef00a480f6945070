#!/usr/bin/env bash
# Side-by-side: sentence-transformers (PyTorch, CPU) and embedfleet's criterion model benches on
# the same checkpoints, sentences and thread count, one after the other in one run, then the
# ratio. Figures go to stdout; record them in docs/benchmarks.md with the machine they ran on.
#
#   scripts/bench-models-side-by-side.sh [THREADS]      (default: all cores)
#
# Needs the reference environment (see scripts/bench-sentence-transformers.py):
#   python3 -m venv .venv-ref && .venv-ref/bin/pip install sentence-transformers torch
# or PYTHON=/path/to/python with those packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
threads=${1:-$(nproc)}
python=${PYTHON:-.venv-ref/bin/python}
[ -x "$python" ] || { echo "error: no reference python at $python (set PYTHON=...)" >&2; exit 1; }

bash scripts/fetch-models.sh >&2
echo "== sentence-transformers, $threads threads" >&2
st_json=$("$python" scripts/bench-sentence-transformers.py --threads "$threads" | tail -n 1)
echo "== embedfleet criterion benches, RAYON_NUM_THREADS=$threads" >&2
# The ci profile and the whole workspace, as scripts/test.sh builds them (nothing to rebuild after
# a test run); only the two real-weight ids of per_model_latency.
RAYON_NUM_THREADS=$threads cargo bench --profile "${BENCH_PROFILE:-ci}" --workspace --bench models \
  -- 'per_model_latency/(minilm|mpnet)@real/' >&2

ST_JSON=$st_json python3 - <<'PY'
import json, os
st = json.loads(os.environ["ST_JSON"])
def median_ns(model, bench):
    with open(f"target/criterion/per_model_latency/{model}@real/{bench}/new/estimates.json") as f:
        return json.load(f)["median"]["point_estimate"]
print(f"threads {st['threads']}, cpu {st['cpu']}, load at start {st['load_average']}")
print(f"{'model':<8} {'ST single ms':>12} {'ours ms':>8} {'speed-up':>8}   {'ST batch32 sent/s':>17} {'ours':>7} {'ratio':>6}")
for model, r in st["results"].items():
    single = median_ns(model, "single") / 1e6
    batch = 32 / (median_ns(model, "batch32") / 1e9)
    print(f"{model:<8} {r['single_ms_median']:>12.2f} {single:>8.2f} {r['single_ms_median'] / single:>7.2f}x   "
          f"{r['batch32_sentences_per_s']:>17.1f} {batch:>7.1f} {batch / r['batch32_sentences_per_s']:>5.2f}x")
PY
