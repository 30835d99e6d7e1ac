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

constexpr int kThreads = 256;       // per block, every kernel
constexpr int kWarp = 32;
constexpr int kUnroll = 4;          // packs (or strided elements) loaded together per thread
constexpr int kPacksPerThread = 8;  // target work per thread when choosing threads per row
constexpr int64_t kFillBlocks = 1024;  // below this many blocks, long rows are split across blocks

template <typename T> constexpr int kPack = 16 / static_cast<int>(sizeof(T));  // elements per 128-bit load

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

// exp for the per-element work. Float uses the hardware exp2 (a few ulp; the
// arguments are <= 0 or near it, where the relative error stays ~1e-7), which
// keeps bf16 rows memory-bound; double stays exact.
__device__ __forceinline__ float element_exp(float x) { return __expf(x); }
__device__ __forceinline__ double element_exp(double x) { return exp(x); }

// --- 128-bit packs ----------------------------------------------------------------------
template <typename T>
union Pack {
  uint4 raw;
  T v[kPack<T>];
};

template <typename T>
__device__ __forceinline__ void load_pack(const T* p, Acc<T>* out) {
  Pack<T> pack;
  pack.raw = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
  for (int e = 0; e < kPack<T>; ++e) out[e] = to_acc(pack.v[e]);
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

// Layout::rows and Layout::row_offset, usable on the device.
__host__ __device__ __forceinline__ int64_t rows_of(const Layout& layout) { return layout.outer * layout.inner; }

__host__ __device__ __forceinline__ int64_t row_offset(const Layout& layout, int64_t row) {
  return (row / layout.inner) * layout.classes * layout.inner + row % layout.inner;
}

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
  s.active = s.row < rows_of(layout);
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

template <int N, int W, bool kLabels, bool kWrites, typename T, typename Visit>
__device__ __forceinline__ void visit_packs(const RowPointers<T>& p, int64_t j0, int64_t step, Visit& visit) {
  using A = Acc<T>;
  A z[N], t[N];
#pragma unroll
  for (int u = 0; u < N / W; ++u) {
    load_pack(p.z + j0 + u * step, z + u * W);
    if (kLabels) load_pack(p.t + j0 + u * step, t + u * W);
  }
  visit.template operator()<N, W>(z, t, N, j0, step);
  if (kWrites) {
#pragma unroll
    for (int u = 0; u < N / W; ++u) store_pack(p.out + j0 + u * step, z + u * W);
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
  // Head up to the first 16-byte boundary, whole packs, then a tail: each of
  // the head and tail is shorter than a pack, one element per lane.
  const int64_t misaligned = (reinterpret_cast<uintptr_t>(p.z + begin) % 16) / sizeof(T);
  const int64_t body = min(end, begin + (misaligned ? V - misaligned : 0));
  const int64_t packs = (end - body) / V;
  const int64_t tail = body + packs * V;
  if (lane < body - begin) visit_elements<1, kLabels, kWrites>(p, begin + lane, 1, body, visit);
  const int64_t step = int64_t{group} * V;
  int64_t k = lane;
  for (; k + (kUnroll - 1) * group < packs; k += kUnroll * group)
    visit_packs<kUnroll * V, V, kLabels, kWrites>(p, body + k * V, step, visit);
  for (; k < packs; k += group) visit_packs<V, V, kLabels, kWrites>(p, body + k * V, step, visit);
  if (lane < end - tail) visit_elements<1, kLabels, kWrites>(p, tail + lane, 1, end, visit);
}

// --- Reductions over the `group` threads of a row ----------------------------------------
// The result is complete in the group's first thread only; every thread of the
// block must call these (they shuffle and may synchronise).
template <typename A>
__device__ __forceinline__ RowSums<A> shuffle_down(const RowSums<A>& s, int offset, bool mean, bool labels) {
  constexpr unsigned kAll = 0xffffffffu;
  RowSums<A> o;
  o.max = __shfl_down_sync(kAll, s.max, offset);
  o.sum_exp = __shfl_down_sync(kAll, s.sum_exp, offset);
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
// Sums of one batch relative to its own max, as the CPU's block_sums, then
// merged into the thread's running sums (online softmax).
template <typename A, bool kLabels>
struct SumsVisitor {
  RowSums<A> sums;
  bool want_mean;
  A inv_classes;

  template <int N, int W>
  __device__ __forceinline__ void operator()(const A (&z)[N], const A (&t)[N], int n, int64_t, int64_t) {
    RowSums<A> b;
    A m = negative_infinity<A>();
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (e < n) m = nan_sticky_max(m, z[e]);
    b.max = m;
    const bool all_negative_infinity = m == negative_infinity<A>();
    if (want_mean) {
      A gap = 0;
#pragma unroll
      for (int e = 0; e < N; ++e)
        if (e < n) gap += m - z[e];
      b.count = static_cast<A>(n) * inv_classes;
      b.gap = all_negative_infinity ? -negative_infinity<A>() : gap * inv_classes;
    }
    if (kLabels) {
      A label_sum = 0, label_gap = 0;
#pragma unroll
      for (int e = 0; e < N; ++e) {
        if (e < n) {
          label_sum += t[e];
          // An all -inf batch has no finite max: a nonzero label's gap is +inf.
          const A gap = all_negative_infinity ? -negative_infinity<A>() : m - z[e];
          label_gap += t[e] != 0 ? t[e] * gap : A(0);
        }
      }
      b.label_sum = label_sum;
      b.label_gap = label_gap;
    }
    if (!all_negative_infinity) {
      A sum_exp = 0;
#pragma unroll
      for (int e = 0; e < N; ++e)
        if (e < n) sum_exp += element_exp(z[e] - m);
      b.sum_exp = sum_exp;
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
// for dense ones, with p_j = exp((z_j - hi) - lo) as in row_math's softmax_at.
template <typename A, bool kDense>
struct GradientVisitor {
  BackwardCoefficients<A> c;
  SplitLse<A> lse;
  int64_t label;  // sparse: the target class, or -1

  template <int N, int W>
  __device__ __forceinline__ void operator()(A (&z)[N], const A (&t)[N], int, int64_t j0, int64_t step) {
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const A p = element_exp((z[e] - lse.hi) - lse.lo);
      const A g = c.softmax_scale * p - (kDense ? c.target_scale * t[e] : A(0)) - c.uniform;
      if (kDense) {
        z[e] = g;
      } else {
        const int64_t j = j0 + (e / W) * step + e % W;
        z[e] = j == label ? g - c.target_scale : g;
      }
    }
  }
};

}  // namespace
}  // namespace cuda
}  // namespace fused_xent
