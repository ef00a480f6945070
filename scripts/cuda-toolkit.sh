#!/usr/bin/env bash
# Installs the CUDA 13.0 build tools from PyPI into tools/cuda (nvcc, NVVM, headers, and the
# runtime libraries the CUDA build links against) and prints the CUDA_HOME to build with.
#
# Why PyPI: it is reachable from CI and from machines without NVIDIA's apt repository, and its
# wheels pin exact versions. Why 13.0: the PTX that candle's kernels are compiled to must not be
# newer than the driver that JIT-compiles it; 13.0 is what driver 580 (the GPU machines this was
# run on) understands, and every later driver reads it too.
#
# Why a stub libcuda: the driver library (libcuda.so.1) ships with the NVIDIA driver, not the
# toolkit wheels, and cudarc links against it. The stub exports the driver API's names so the
# linker can record the dependency; at run time the real driver's library is loaded instead,
# exactly as with the toolkit's own lib64/stubs/libcuda.so.
#
# Idempotent: a second run only checks that the tools are there. Progress goes to stderr; the only
# line on stdout is CUDA_HOME.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

version=13.0
root="$PWD/tools/cuda/$version"
home="$root/nvidia/cu13"
packages=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.0.19
  nvidia-curand==10.4.0.35
)

if [ ! -x "$home/bin/nvcc" ] || [ ! -e "$root/.complete" ]; then
  echo "cuda-toolkit: installing CUDA $version build tools from PyPI into $root (~1.3 GB)" >&2
  rm -rf "$root"
  mkdir -p "$root"
  python3 -m pip install --quiet --no-deps --only-binary=:all: --target "$root" "${packages[@]}" >&2
  touch "$root/.complete"
fi

# Unversioned names for the linker (the wheels ship only the sonames).
lib="$home/lib"
for soname in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  [ -e "$lib/$soname" ] || { echo "cuda-toolkit: $lib/$soname missing" >&2; exit 1; }
  ln -sfn "$soname" "$lib/${soname%%.so*}.so"
done
# nvcc looks for NVVM (cicc, libdevice) beside bin/ and for its host compiler on PATH.
[ -x "$home/nvvm/bin/cicc" ] || { echo "cuda-toolkit: NVVM (cicc) missing under $home/nvvm" >&2; exit 1; }

# The driver-API stub, from the names cudarc itself binds (so it always covers what is linked).
stub="$lib/stubs/libcuda.so"
if [ ! -e "$stub" ]; then
  bindings="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -1)"
  [ -n "$bindings" ] || { echo "cuda-toolkit: cudarc sources not found; run 'cargo fetch' first" >&2; exit 1; }
  mkdir -p "$lib/stubs"
  # Every `fn cu...` the bindings declare or wrap (extra names in a stub are harmless).
  grep -oE '\bfn cu[A-Za-z0-9_]+\(' "$bindings" | sed -E 's/^fn (.*)\($/\1/' | sort -u \
    | awk '{printf "void %s(void) {}\n", $1}' > "$lib/stubs/libcuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$lib/stubs/libcuda-stub.c"
  echo "cuda-toolkit: driver stub with $(grep -c void "$lib/stubs/libcuda-stub.c") symbols" >&2
fi

"$home/bin/nvcc" --version | tail -2 >&2
echo "$home"
