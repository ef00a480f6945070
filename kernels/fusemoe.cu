// FuseMoE forward kernels (Han et al., 2024, "FuseMoE: Mixture-of-Experts Transformers for
// Fleximodal Fusion") for embedfleet-fusion's `cuda` feature. Compiled at run time with NVRTC
// (crates/embedfleet-fusion/src/cuda.rs includes this file with include_str!), so no CUDA
// toolkit is needed to build the crate, and no CUDA header is included here: bf16 weights are
// raw 16-bit patterns widened by a shift, which NVRTC compiles for any architecture.
//
// Layout matches the CPU path: weights are PyTorch [out_features, in_features], row-major;
// activations are row-major [rows, features]. The host drives the steps:
//   linear (gate.proj) -> layer_norm_gelu -> linear (router) | laplace_logits -> route_top_k
//   -> (host groups rows by expert) -> per expert: linear (fc1, GELU fused) -> linear (fc2)
//   -> combine_normalize.

#define WARP 32
#define LINEAR_WARPS 8       // warps (= weight rows) per block in the linear kernels
#define LINEAR_ROWS 8        // input rows each warp carries in registers per pass
#define BLOCK 256            // threads per block in the per-row kernels

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(unsigned short v) {
    return __uint_as_float(((unsigned int)v) << 16);
}

__device__ __forceinline__ float gelu(float z) {
    return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = WARP / 2; offset > 0; offset /= 2) {
        v += __shfl_down_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds BLOCK / WARP floats.
__device__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % WARP;
    const int warp = threadIdx.x / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < (int)(blockDim.x / WARP); ++w) total += scratch[w];
    return total;
}

// out[out_rows[r] * out_stride + j] = act(bias[j] + sum_k W[j, k] * X[x_rows[r] * x_stride + k])
// for r < m and j < n. One warp per weight row: the row is read once per LINEAR_ROWS input
// rows, coalesced, which is what the memory-bound skinny products of FuseMoE need.
template <typename WT>
__device__ void linear_rows(const WT* __restrict__ weight, const float* __restrict__ bias,
                            const float* __restrict__ x, int x_stride,
                            const int* __restrict__ x_rows, int m, int k, int n,
                            float* __restrict__ out, int out_stride,
                            const int* __restrict__ out_rows, int apply_gelu) {
    const int lane = threadIdx.x % WARP;
    const int j = blockIdx.x * LINEAR_WARPS + threadIdx.x / WARP;
    if (j >= n) return;
    const WT* w = weight + (size_t)j * k;
    for (int r0 = 0; r0 < m; r0 += LINEAR_ROWS) {
        const int rn = min(LINEAR_ROWS, m - r0);
        const float* xr[LINEAR_ROWS];
        float acc[LINEAR_ROWS];
#pragma unroll
        for (int r = 0; r < LINEAR_ROWS; ++r) {
            xr[r] = x + (size_t)x_rows[r0 + min(r, rn - 1)] * x_stride;
            acc[r] = 0.0f;
        }
#pragma unroll 4
        for (int t = lane; t < k; t += WARP) {
            const float wv = widen(w[t]);
#pragma unroll
            for (int r = 0; r < LINEAR_ROWS; ++r) {
                acc[r] = fmaf(wv, xr[r][t], acc[r]);
            }
        }
#pragma unroll
        for (int r = 0; r < LINEAR_ROWS; ++r) {
            const float s = warp_sum(acc[r]);
            if (lane == 0 && r < rn) {
                float v = s + bias[j];
                if (apply_gelu) v = gelu(v);
                out[(size_t)out_rows[r0 + r] * out_stride + j] = v;
            }
        }
    }
}

extern "C" __global__ void linear_f32(const float* weight, const float* bias, const float* x,
                                      int x_stride, const int* x_rows, int m, int k, int n,
                                      float* out, int out_stride, const int* out_rows,
                                      int apply_gelu) {
    linear_rows<float>(weight, bias, x, x_stride, x_rows, m, k, n, out, out_stride, out_rows,
                       apply_gelu);
}

extern "C" __global__ void linear_bf16(const unsigned short* weight, const float* bias,
                                       const float* x, int x_stride, const int* x_rows, int m,
                                       int k, int n, float* out, int out_stride,
                                       const int* out_rows, int apply_gelu) {
    linear_rows<unsigned short>(weight, bias, x, x_stride, x_rows, m, k, n, out, out_stride,
                                out_rows, apply_gelu);
}

// In place, one block per row: h <- gelu(LayerNorm(h) * gamma + beta).
extern "C" __global__ void layer_norm_gelu(float* h, const float* gamma, const float* beta,
                                           int width, float eps) {
    __shared__ float scratch[BLOCK / WARP];
    float* row = h + (size_t)blockIdx.x * width;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) sum += row[i];
    const float mean = block_sum(sum, scratch) / width;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        const float d = row[i] - mean;
        sq += d * d;
    }
    const float inv_std = rsqrtf(block_sum(sq, scratch) / width + eps);
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        row[i] = gelu((row[i] - mean) * inv_std * gamma[i] + beta[i]);
    }
}

// The paper's Laplace gate: logits[row, e] = -|| h[row] - centroid[e] ||_2.
// Grid (experts, rows), one warp per block.
extern "C" __global__ void laplace_logits(const float* h, const float* centroids, int width,
                                          int experts, float* logits) {
    const int e = blockIdx.x;
    const int row = blockIdx.y;
    const float* hv = h + (size_t)row * width;
    const float* c = centroids + (size_t)e * width;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < width; i += WARP) {
        const float d = hv[i] - c[i];
        sq += d * d;
    }
    sq = warp_sum(sq);
    if (threadIdx.x == 0) logits[(size_t)row * experts + e] = -sqrtf(sq);
}

// One thread per row: the top-k logits (descending; ties go to the lower expert index, as on
// the CPU) and their softmax at `temperature`.
extern "C" __global__ void route_top_k(const float* logits, int rows, int experts, int top_k,
                                       float temperature, int* selected, float* weights) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const float* l = logits + (size_t)row * experts;
    int* sel = selected + (size_t)row * top_k;
    float* wt = weights + (size_t)row * top_k;
    for (int s = 0; s < top_k; ++s) {
        int best = -1;
        for (int e = 0; e < experts; ++e) {
            bool taken = false;
            for (int p = 0; p < s; ++p) taken |= (sel[p] == e);
            if (!taken && (best < 0 || l[e] > l[best])) best = e;
        }
        sel[s] = best;
    }
    const float top = l[sel[0]];
    float total = 0.0f;
    for (int s = 0; s < top_k; ++s) {
        wt[s] = expf((l[sel[s]] - top) / temperature);
        total += wt[s];
    }
    for (int s = 0; s < top_k; ++s) wt[s] /= total;
}

// One block per row: fused = sum_s weights[row, s] * expert_out[row * top_k + s] (slot order,
// as on the CPU), then scaled to unit L2 norm. A slot dropped by capacity limiting has
// weight 0.
extern "C" __global__ void combine_normalize(const float* expert_out, const float* weights,
                                             int top_k, int width, float* fused) {
    __shared__ float scratch[BLOCK / WARP];
    const int row = blockIdx.x;
    float* out = fused + (size_t)row * width;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < top_k; ++s) {
            const float w = weights[(size_t)row * top_k + s];
            if (w != 0.0f) v += w * expert_out[((size_t)row * top_k + s) * width + i];
        }
        out[i] = v;
        sq += v * v;
    }
    const float inv = 1.0f / sqrtf(block_sum(sq, scratch));
    for (int i = threadIdx.x; i < width; i += blockDim.x) out[i] *= inv;
}
