// Device building blocks shared by the sparse and dense kernels: element
// conversion, 128-bit packs, how rows are cut between threads (the plan), the
// walk over a slice of a row, and reductions over the threads of a row.
// CUDA headers only; the per-row formulas come from core/row_math.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/row_math.h"
#include "cuda/launchers.h"

namespace fused_xent {
namespace cuda {
namespace {

// Tuning knobs (defines, for experiments): the defaults measured best on an H200.
#ifndef FX_CUDA_UNROLL
#define FX_CUDA_UNROLL 4
#endif
#ifndef FX_CUDA_MIN_BLOCKS
#define FX_CUDA_MIN_BLOCKS 3
#endif
#ifndef FX_CUDA_PACKS_PER_THREAD
#define FX_CUDA_PACKS_PER_THREAD 32
#endif

constexpr int kThreads = 256;  // per block, every kernel
constexpr int kWarp = 32;
constexpr int kUnroll = FX_CUDA_UNROLL;                    // packs (or strided elements) loaded together
constexpr int kMinBlocks = FX_CUDA_MIN_BLOCKS;             // per SM: more loads in flight
constexpr int kPacksPerThread = FX_CUDA_PACKS_PER_THREAD;  // sets how many threads share a row
constexpr int64_t kFillBlocks = 1024;  // below this many blocks, long rows are split across blocks

template <typename T> constexpr int kPack = 16 / static_cast<int>(sizeof(T));  // elements per 128-bit load
// Double rows need the registers more than the occupancy.
template <typename T> constexpr int kMinBlocksOf = sizeof(T) == 8 ? 1 : kMinBlocks;

// --- Conversions: hardware instructions, round to nearest even ------------------------
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(float16_t v) { return __half2float(__ushort_as_half(v.bits)); }
__device__ __forceinline__ float to_acc(bfloat16_t v) { return __uint_as_float(static_cast<uint32_t>(v.bits) << 16); }

template <typename T> __device__ __forceinline__ T from_acc(Acc<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ float16_t from_acc<float16_t>(float v) {
  return float16_t{__half_as_ushort(__float2half_rn(v))};
}
template <> __device__ __forceinline__ bfloat16_t from_acc<bfloat16_t>(float v) {
  return bfloat16_t{__bfloat16_as_ushort(__float2bfloat16_rn(v))};
}

// exp for the per-element work. Float uses the hardware exp2, flushing results
// below 2^-126 to 0 (a few ulp; the arguments are <= 0 or near it), which keeps
// 16-bit rows memory-bound; double stays exact.
constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float element_exp(float x) { return exp2_ftz(x * kLog2e); }
__device__ __forceinline__ double element_exp(double x) { return exp(x); }

// --- 128-bit packs ----------------------------------------------------------------------
template <typename T>
union Pack {
  uint4 raw;
  T v[kPack<T>];
};

// Not __ldg: the gradient may overwrite the logits.
template <typename T>
__device__ __forceinline__ void load_pack(const T* p, Acc<T>* out) {
  Pack<T> pack;
  pack.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int e = 0; e < kPack<T>; ++e) out[e] = to_acc(pack.v[e]);
}

// Two bfloat16 per 32-bit word: one shift or mask each.
template <>
__device__ __forceinline__ void load_pack<bfloat16_t>(const bfloat16_t* p, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    out[2 * w] = __uint_as_float(words[w] << 16);
    out[2 * w + 1] = __uint_as_float(words[w] & 0xffff0000u);
  }
}

template <>
__device__ __forceinline__ void load_pack<float16_t>(const float16_t* p, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    __half2 pair;
    memcpy(&pair, &words[w], sizeof pair);
    const float2 f = __half22float2(pair);
    out[2 * w] = f.x;
    out[2 * w + 1] = f.y;
  }
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Acc<T>* in) {
  Pack<T> pack;
#pragma unroll
  for (int e = 0; e < kPack<T>; ++e) pack.v[e] = from_acc<T>(in[e]);
  *reinterpret_cast<uint4*>(p) = pack.raw;
}

// --- Plan: shape-only (plus one alignment test), so a call is deterministic -----------
// `group` threads (a power of two) share a row; a block holds kThreads / group
// rows. Rows too long for the grid to fill the GPU are cut into `splits`
// chunks of `chunk` classes, one block each, merged by a second kernel.
struct Plan {
  int group = 1;
  int splits = 1;
  int64_t chunk = 0;
  int64_t blocks = 0;       // grid.x
  bool vectorized = false;  // contiguous rows and every buffer at the same 16-byte phase
};


inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int pow2_at_least(int64_t n, int cap) {
  int p = 1;
  while (p < n && p < cap) p *= 2;
  return p;
}

// `buffers` are the row-major tensors a kernel reads or writes element-wise.
inline Plan make_plan(const Layout& layout, int element_size, const void* const* buffers, int count) {
  Plan plan;
  const int64_t rows = layout.rows(), classes = layout.classes;
  const int pack = 16 / element_size;
  if (layout.inner == 1) {
    const int64_t packs = ceil_div(classes, pack);
    plan.group = pow2_at_least(ceil_div(packs, kPacksPerThread), kThreads);
    const uintptr_t phase = reinterpret_cast<uintptr_t>(buffers[0]) % 16;
    plan.vectorized = true;
    for (int i = 1; i < count; ++i)
      plan.vectorized = plan.vectorized && reinterpret_cast<uintptr_t>(buffers[i]) % 16 == phase;
  }
  plan.blocks = ceil_div(rows, kThreads / plan.group);
  // Only worth it when rows are few and long: a chunk keeps every thread busy.
  const int64_t min_chunk = layout.inner == 1 ? int64_t{plan.group} * kPacksPerThread * pack : 256;
  int64_t splits = 1;
  if (plan.blocks < kFillBlocks && classes >= 2 * min_chunk)
    splits = std::min(ceil_div(kFillBlocks, plan.blocks), ceil_div(classes, min_chunk));
  plan.chunk = ceil_div(ceil_div(classes, splits), pack) * pack;
  plan.splits = static_cast<int>(ceil_div(classes, plan.chunk));
  return plan;
}

inline dim3 grid_of(const Plan& plan) {
  return dim3(static_cast<unsigned>(plan.blocks), static_cast<unsigned>(plan.splits));
}

inline const char* check_grid(const Plan& plan) {
  return plan.blocks > 0x7fffffff ? "fused_xent CUDA: too many rows for one launch" : nullptr;
}

inline const char* launch_status() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

// Where this thread works: its row, its lane within the row's group, and the
// classes [begin, end) of this block's chunk.
struct Slot {
  int64_t row;
  int lane;
  bool active;
  int64_t begin, end;
};

__device__ __forceinline__ Slot slot_of(const Plan& plan, const Layout& layout) {
  Slot s;
  const int rows_per_block = kThreads / plan.group;
  s.row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / plan.group;
  s.lane = threadIdx.x & (plan.group - 1);
  s.active = s.row < layout.rows();
  s.begin = static_cast<int64_t>(blockIdx.y) * plan.chunk;
  s.end = min(layout.classes, s.begin + plan.chunk);
  return s;
}

// --- Walking a row slice ----------------------------------------------------------------
// visit(z, t, n, j0, step) sees a batch of N values (the first n valid) whose
// element e sits at class j0 + (e / W) * step + e % W: W = pack width for packs,
// 1 for single elements. With kWrites, the visitor replaces z by the outputs.
// The split of a slice between lanes depends only on its length and its
// 16-byte phase, so repeated calls add in the same order.
template <typename T>
struct RowPointers {
  const T* z;    // logits of the row (or the labels, for a label sum)
  const T* t;    // dense labels of the row, or null
  T* out;        // gradient of the row, or null
  int64_t stride;
};

// `count` packs (all kUnroll when kFull) at j0, j0 + step, ...: their loads
// are issued together, so a thread waits for memory once per batch.
template <bool kFull, bool kLabels, bool kWrites, typename T, typename Visit>
__device__ __forceinline__ void visit_packs(const RowPointers<T>& p, int64_t j0, int64_t step, int count,
                                            Visit& visit) {
  using A = Acc<T>;
  constexpr int V = kPack<T>, N = kUnroll * V;
  A z[N], t[N];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (kFull || u < count) {
      load_pack(p.z + j0 + u * step, z + u * V);
      if (kLabels) load_pack(p.t + j0 + u * step, t + u * V);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) z[u * V + e] = t[u * V + e] = A(0);
    }
  }
  visit.template operator()<N, V>(z, t, kFull ? N : count * V, j0, step);
  if (kWrites) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (kFull || u < count) store_pack(p.out + j0 + u * step, z + u * V);
  }
}

// Up to N elements j0, j0 + step, ... below `end`, one at a time (strided rows, heads, tails).
template <int N, bool kLabels, bool kWrites, typename T, typename Visit>
__device__ __forceinline__ void visit_elements(const RowPointers<T>& p, int64_t j0, int64_t step, int64_t end,
                                               Visit& visit) {
  using A = Acc<T>;
  A z[N], t[N];
  int n = 0;
#pragma unroll
  for (int e = 0; e < N; ++e) {
    const int64_t j = j0 + e * step;
    if (j < end) {
      z[e] = to_acc(p.z[j * p.stride]);
      if (kLabels) t[e] = to_acc(p.t[j * p.stride]);
      n = e + 1;
    }
  }
  if (n == 0) return;
  visit.template operator()<N, 1>(z, t, n, j0, step);
  if (kWrites) {
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (e < n) p.out[(j0 + e * step) * p.stride] = from_acc<T>(z[e]);
  }
}

template <bool kLabels, bool kWrites, typename T, typename Visit>
__device__ void walk_slice(const RowPointers<T>& p, int64_t begin, int64_t end, int lane, int group, bool vectorized,
                           Visit& visit) {
  constexpr int V = kPack<T>;
  if (!vectorized) {
    int64_t j = begin + lane;
    for (; j + (kUnroll - 1) * group < end; j += kUnroll * group)
      visit_elements<kUnroll, kLabels, kWrites>(p, j, group, end, visit);
    visit_elements<kUnroll, kLabels, kWrites>(p, j, group, end, visit);
    return;
  }
  // Head up to the first 16-byte boundary, whole packs, then a tail; the head
  // and the tail are shorter than a pack.
  const int64_t misaligned = (reinterpret_cast<uintptr_t>(p.z + begin) % 16) / sizeof(T);
  const int64_t body = min(end, begin + (misaligned ? V - misaligned : 0));
  const int64_t packs = (end - body) / V;
  const int64_t tail = body + packs * V;
  visit_elements<V, kLabels, kWrites>(p, begin + lane, group, body, visit);
  const int64_t step = int64_t{group} * V;
  for (int64_t k = lane; k < packs; k += kUnroll * group) {
    const int64_t count = (packs - k + group - 1) / group;  // this lane's packs from k on
    if (count >= kUnroll)
      visit_packs<true, kLabels, kWrites>(p, body + k * V, step, kUnroll, visit);
    else
      visit_packs<false, kLabels, kWrites>(p, body + k * V, step, static_cast<int>(count), visit);
  }
  visit_elements<V, kLabels, kWrites>(p, tail + lane, group, end, visit);
}

// --- Reductions over the `group` threads of a row ----------------------------------------
// The result is complete in the group's first thread only; every thread of the
// block must call these (they shuffle and may synchronise).
template <typename A>
__device__ __forceinline__ RowSums<A> shuffle_down(const RowSums<A>& s, int offset, bool mean, bool labels) {
  constexpr unsigned kAll = 0xffffffffu;
  RowSums<A> o;
  o.max = __shfl_down_sync(kAll, s.max, offset);
  o.ties = __shfl_down_sync(kAll, s.ties, offset);
  o.rest = __shfl_down_sync(kAll, s.rest, offset);
  if (mean) {
    o.gap = __shfl_down_sync(kAll, s.gap, offset);
    o.count = __shfl_down_sync(kAll, s.count, offset);
  }
  if (labels) {
    o.label_sum = __shfl_down_sync(kAll, s.label_sum, offset);
    o.label_gap = __shfl_down_sync(kAll, s.label_gap, offset);
  }
  return o;
}

template <typename A>
__device__ RowSums<A> reduce_row_sums(RowSums<A> s, int group, bool mean, bool labels) {
  // Raw storage: __shared__ variables cannot have RowSums' default initialisers.
  __shared__ alignas(RowSums<A>) unsigned char storage[sizeof(RowSums<A>) * (kThreads / kWarp)];
  RowSums<A>* warp_sums = reinterpret_cast<RowSums<A>*>(storage);
  for (int offset = min(group, kWarp) / 2; offset > 0; offset /= 2) merge_sums(s, shuffle_down(s, offset, mean, labels));
  if (group <= kWarp) return s;
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) warp_sums[warp] = s;
  __syncthreads();
  if (threadIdx.x % group == 0)
    for (int w = 1; w < group / kWarp; ++w) merge_sums(s, warp_sums[warp + w]);
  return s;
}

template <typename A>
__device__ A reduce_sum(A s, int group) {
  __shared__ A warp_sums[kThreads / kWarp];
  for (int offset = min(group, kWarp) / 2; offset > 0; offset /= 2) s += __shfl_down_sync(0xffffffffu, s, offset);
  if (group <= kWarp) return s;
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) warp_sums[warp] = s;
  __syncthreads();
  if (threadIdx.x % group == 0)
    for (int w = 1; w < group / kWarp; ++w) s += warp_sums[warp + w];
  return s;
}

// --- Visitors -------------------------------------------------------------------------------
// In-register tree reductions over a batch: short dependency chains. The
// widths are template arguments so every index is a constant (no local memory).
template <int Width, int N, typename A, typename Op>
__device__ __forceinline__ void tree_step(A (&v)[N], Op op) {
  if constexpr (Width > 0) {
#pragma unroll
    for (int e = 0; e < Width; ++e) v[e] = op(v[e], v[e + Width]);
    tree_step<Width / 2>(v, op);
  }
}

template <int N, typename A, typename Op>
__device__ __forceinline__ A tree_reduce(A (&v)[N], Op op) {
  static_assert((N & (N - 1)) == 0, "batches are a power of two long");
  tree_step<N / 2>(v, op);
  return v[0];
}

struct Add {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};
struct Max {  // ignores NaN: a NaN still reaches the row through rest
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
};

// Sums of one batch relative to its own max, as the CPU's block_sums, then
// merged into the thread's running sums (online softmax). N is a power of two.
template <typename A, bool kLabels>
struct SumsVisitor {
  RowSums<A> sums;
  bool want_mean;
  A inv_classes;

  template <int N, int W>
  __device__ __forceinline__ void operator()(const A (&z)[N], const A (&t)[N], int n, int64_t, int64_t) {
    const A kInf = -negative_infinity<A>();
    A v[N];
#pragma unroll
    for (int e = 0; e < N; ++e) v[e] = e < n ? z[e] : -kInf;
    A m = tree_reduce(v, Max());
    RowSums<A> b;
    if (m == -kInf) {  // all -inf, or -inf and NaN: keep the NaN
#pragma unroll
      for (int e = 0; e < N; ++e)
        if (e < n && z[e] != z[e]) m = z[e];
    }
    b.max = m;
    const bool all_negative_infinity = m == -kInf;
    if (want_mean) {
#pragma unroll
      for (int e = 0; e < N; ++e) v[e] = e < n ? m - z[e] : A(0);
      b.count = static_cast<A>(n) * inv_classes;
      b.gap = all_negative_infinity ? kInf : tree_reduce(v, Add()) * inv_classes;
    }
    if (kLabels) {
      A w[N];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        // An all -inf batch has no finite max: a nonzero label's gap is +inf.
        const A gap = all_negative_infinity ? kInf : m - z[e];
        v[e] = e < n ? t[e] : A(0);
        w[e] = e < n && t[e] != 0 ? t[e] * gap : A(0);
      }
      b.label_sum = tree_reduce(v, Add());
      b.label_gap = tree_reduce(w, Add());
    }
    if (!all_negative_infinity) {  // the max's terms counted apart, as RowSums wants
      A ties[N];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        const A d = e < n ? z[e] - m : -kInf;
        ties[e] = d == 0 ? A(1) : A(0);
        v[e] = d == 0 ? A(0) : element_exp(d);
      }
      b.ties = tree_reduce(ties, Add());
      b.rest = tree_reduce(v, Add());
    }
    merge_sums(sums, b);
  }
};

template <typename A>
struct AddVisitor {
  A sum = 0;
  template <int N, int W>
  __device__ __forceinline__ void operator()(const A (&z)[N], const A (&)[N], int n, int64_t, int64_t) {
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (e < n) sum += z[e];
  }
};

// Writes one value everywhere (rows with a NaN or an exactly zero gradient).
template <typename A>
struct FillVisitor {
  A value;
  template <int N, int W>
  __device__ __forceinline__ void operator()(A (&z)[N], const A (&)[N], int, int64_t, int64_t) {
#pragma unroll
    for (int e = 0; e < N; ++e) z[e] = value;
  }
};

// dz_j = a * p_j - b * [j == label] - u for sparse labels, or a * p_j - b * t_j - u
// for dense ones, by row_math's gradient_from, with p_j = exp((z_j - hi) - lo) as
// in row_math's softmax_at (the low part folded into the exponent's scaling for float).
template <typename A, bool kDense>
struct GradientVisitor {
  BackwardCoefficients<A> c;
  SplitLse<A> lse;
  int64_t label;  // sparse: the target class, or -1

  __device__ __forceinline__ A softmax(A z) const {
    if constexpr (sizeof(A) == 4) return exp2_ftz(fmaf(z - lse.hi, kLog2e, -lse.lo * kLog2e));
    return softmax_at(z, lse);
  }

  template <int N, int W>
  __device__ __forceinline__ void operator()(A (&z)[N], const A (&t)[N], int, int64_t j0, int64_t step) {
    A target[N];
#pragma unroll
    for (int e = 0; e < N; ++e) target[e] = kDense ? c.target_scale * t[e] + c.uniform : c.uniform;
    if (!kDense) {
      // The target column, if in this batch: one test per group of W adjacent elements.
      const int64_t label_offset = label - j0;
#pragma unroll
      for (int u = 0; u < N / W; ++u) {
        const int64_t offset = label_offset - u * step;
        if (offset >= 0 && offset < W) {
#pragma unroll
          for (int e = 0; e < W; ++e)
            if (e == offset) target[u * W + e] += c.target_scale;
        }
      }
    }
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const A p = softmax(z[e]);
      z[e] = p > A(0.5) ? gradient_from(c.softmax_scale, target[e], log_softmax_at(z[e], lse), p)
                        : c.softmax_scale * p - target[e];
    }
  }
};

}  // namespace
}  // namespace cuda
}  // namespace fused_xent
