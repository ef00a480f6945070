#!/usr/bin/env bash
# The GPU check: everything embedfleet claims about GPUs, run on a machine that has one and no
# Rust toolchain. Two steps:
#
#   scripts/gpu-check.sh prepare     # here: CUDA build (scripts/cuda-build.sh), then .gpu/ holds
#                                    # the stripped binaries, nats-server and checkpoint templates
#   scripts/gpu-check.sh run OUTDIR  # there, from the repository root, with .gpu/ carried along
#
# `run` writes OUTDIR/gpu-check.json (the figures) and OUTDIR/gpu-check.log, and:
#   1. every architecture's CPU-vs-GPU parity on the fixture checkpoints (cosine ≥ 0.999 f32,
#      ≥ 0.99 bf16) and a padded GPU batch against single calls;
#   2. FuseMoE's CUDA kernels against the CPU forward (f32 and bf16 weights);
#   3. full-size random checkpoints of the real configs made there with torch
#      (scripts/gpu/make_full_size.py), and the GPU bench on them (benches/gpu.rs): batch-1
#      latency and batch-32 throughput per model, FuseMoE at the full shape;
#   4. a fleet on the GPU: `embedfleet bench run` against `serve --device cuda:0`.
# Sized to finish in under 8 minutes on one H100/H200; GPU_CHECK_MODELS picks the full-size models.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

carry=.gpu

prepare() {
  mapfile -t built < <(bash scripts/cuda-build.sh)
  rm -rf "$carry"
  mkdir -p "$carry/bin" "$carry/templates"
  grep -qxF "/$carry/" .git/info/exclude 2>/dev/null || echo "/$carry/" >> .git/info/exclude
  for binary in "${built[@]}"; do
    name="$(basename "$binary")"
    # Test binaries are named <target>-<hash>: keep the crate in the name.
    case "$binary" in
      */deps/cuda_parity-*)
        crate="$(strings -n 8 "$binary" | grep -oE 'embedfleet-(models|fusion)/tests/cuda_parity' | head -1 | cut -d/ -f1)"
        name="${crate:-unknown}-cuda_parity" ;;
      */deps/gpu-*) name=gpu-bench ;;
    esac
    strip -o "$carry/bin/$name" "$binary"
  done
  cp "$(bash scripts/fetch-nats-server.sh)" "$carry/bin/nats-server"
  # Templates for make_full_size.py: the non-weight files of each model's checkpoint.
  local fixtures=crates/embedfleet-models/tests/fixtures/checkpoints
  template() { # name source
    mkdir -p "$carry/templates/$1"
    (cd "$2" && find . -type f ! -name '*.safetensors' ! -name '*.bin' ! -name '*reference.json' \
      -exec cp --parents {} "$OLDPWD/$carry/templates/$1/" \;)
  }
  template minilm models/minilm
  template bge-large models/minilm   # the same uncased BERT vocabulary
  template mpnet models/mpnet
  template instructor-xl "$fixtures/t5-gated/instructor-xl"
  template sentence-t5-xxl "$fixtures/t5-gated/sentence-t5-xxl"
  template e5-mistral "$fixtures/mistral-gqa4-headdim/e5-mistral"
  # Compressed: the whole working tree a device call carries is limited to 64 MiB.
  tar -C "$carry" -cJf "$carry/bin.tar.xz" bin && rm -rf "$carry/bin"
  du -sh "$carry" "$carry"/* >&2
}

# One JSON of every figure so far (rewritten after each step that adds some).
figures() {
  python3 - "$@" <<'EOF'
import glob, json, os, re, sys
path, parity, fusion_parity = sys.argv[1:4]
figures = {"models_parity": parity, "fusion_parity": fusion_parity}
figures["gpu"] = open(os.path.join(os.path.dirname(path), "gpu.txt")).read().strip()
text = open(os.path.join(os.path.dirname(path), "models-parity.txt")).read()
figures["models_parity_detail"] = re.findall(r"GPU_PARITY (.*)", text)
bench = {}
for estimates in glob.glob("/tmp/embedfleet-criterion/**/new/estimates.json", recursive=True):
    bench_file = os.path.join(os.path.dirname(estimates), "benchmark.json")
    meta = json.load(open(bench_file))
    est = json.load(open(estimates))
    entry = {"median_ms": est["median"]["point_estimate"] / 1e6,
             "mean_ms": est["mean"]["point_estimate"] / 1e6}
    throughput = meta.get("throughput") or {}
    if "Elements" in throughput:
        entry["items_per_s"] = throughput["Elements"] / (est["median"]["point_estimate"] / 1e9)
    bench[meta["full_id"]] = entry
figures["bench"] = dict(sorted(bench.items()))
json.dump(figures, open(path, "w"), indent=1)
print(json.dumps(figures, indent=1))
EOF
}

run() {
  local out="${1:?usage: gpu-check.sh run OUTDIR}"
  mkdir -p "$out"
  local log="$out/gpu-check.log" json="$out/gpu-check.json"
  exec > >(tee -a "$log") 2>&1
  local started=$SECONDS
  step() { echo; echo "==== $* ($((SECONDS - started)) s)"; }

  step "machine"
  tar -C "$carry" -xJf "$carry/bin.tar.xz"
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$out/gpu.txt"
  # Binaries built here bake this checkout's absolute path in (fixtures, bench sentences).
  local built_root=/work/main
  if [ "$PWD" != "$built_root" ] && [ ! -e "$built_root" ]; then
    mkdir -p "$(dirname "$built_root")" && ln -s "$PWD" "$built_root"
  fi
  # The CUDA 13 runtime libraries the build links: the image's CUDA toolkit or its PyPI wheels.
  LD_LIBRARY_PATH="$(python3 - <<'EOF'
import glob, os, site
wanted = ["libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13", "libcurand.so.10", "libnvrtc.so.13"]
roots = site.getsitepackages() + ["/usr/local/cuda", "/usr/local/nvidia"]
dirs = []
for lib in wanted:
    for root in roots:
        hits = glob.glob(os.path.join(root, "**", lib), recursive=True)
        if hits:
            d = os.path.dirname(hits[0])
            if d not in dirs:
                dirs.append(d)
            break
print(":".join(dirs + ["/usr/local/nvidia/lib64"]))
EOF
):${LD_LIBRARY_PATH:-}"
  export LD_LIBRARY_PATH
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  local bin="$PWD/$carry/bin"
  ldd "$bin/embedfleet" | grep -E "cuda|cublas|curand|nvrtc|not found" || true

  step "model parity (every architecture, CPU vs GPU)"
  local parity=pass
  (cd crates/embedfleet-models && "$bin/embedfleet-models-cuda_parity" --test-threads=1 --nocapture) \
    > "$out/models-parity.txt" 2>&1 || parity=fail
  cat "$out/models-parity.txt"

  step "FuseMoE parity (CUDA kernels vs CPU)"
  local fusion_parity=pass
  (cd crates/embedfleet-fusion && "$bin/embedfleet-fusion-cuda_parity" --test-threads=1 --nocapture) \
    > "$out/fusion-parity.txt" 2>&1 || fusion_parity=fail
  cat "$out/fusion-parity.txt"

  step "full-size random checkpoints"
  local full=/tmp/embedfleet-full
  local models="${GPU_CHECK_MODELS:-minilm,mpnet,bge-large,instructor-xl,sentence-t5-xxl,e5-mistral}"
  python3 scripts/gpu/make_full_size.py --out "$full" --templates "$carry/templates" \
    --models "$models" > "$out/checkpoints.json" || echo "make_full_size failed"

  step "GPU bench (criterion)"
  export CRITERION_HOME=/tmp/embedfleet-criterion
  EMBEDFLEET_GPU_CHECKPOINTS="$full" GPU_BENCH_QUANTIZED="${GPU_BENCH_QUANTIZED:-bge-large,e5-mistral}" \
    "$bin/gpu-bench" --bench --noplot 2>&1 \
    | grep -vE "^(Warming|Collecting|Analyzing|Benchmarking .*: (Warming|Collecting|Analyzing))" || true

  figures "$json" "$parity" "$fusion_parity"

  step "fleet on the GPU (bench run, small tier)"
  export EMBEDFLEET_NATS_SERVER="$bin/nats-server" EMBEDFLEET_DEVICE=cuda:0 \
    EMBEDFLEET_MODELS_DIR="$full" HF_HUB_OFFLINE=1
  "$bin/embedfleet" bench run --tier small --models minilm,mpnet --concurrency 1,16 --batch 1,32 \
    --requests 80 --no-gate --out /tmp/fleet-bench \
    || echo "fleet bench failed"
  cp /tmp/fleet-bench/latest.json "$out/fleet-bench.json" 2>/dev/null || true

  step "figures"
  figures "$json" "$parity" "$fusion_parity"
  echo "gpu-check: done in $((SECONDS - started)) s"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 prepare | run OUTDIR" >&2; exit 2 ;;
esac
