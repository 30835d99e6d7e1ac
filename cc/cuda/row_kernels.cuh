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
#include "cuda/plan.h"

namespace fused_xent {
namespace cuda {
namespace {

template <typename T> constexpr int kPack = 16 / static_cast<int>(sizeof(T));  // elements per 128-bit load
// Double rows need the registers more than the occupancy.
template <typename T> constexpr int kMinBlocksOf = sizeof(T) == 8 ? 1 : kMinBlocks;

// --- Conversions: hardware instructions, round to nearest even ------------------------
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(float16_t v) { return __half2float(__ushort_as_half(v.bits)); }
__device__ __forceinline__ float to_acc(bfloat16_t v) {
  return __uint_as_float(static_cast<uint32_t>(v.bits) << 16);
}

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
template <typename T> union Pack {
  uint4 raw;
  T v[kPack<T>];
};

// A 16-byte pack's values in the accumulation type.
template <typename T> __device__ __forceinline__ void unpack(const uint4& raw, Acc<T>* out) {
  Pack<T> pack;
  pack.raw = raw;
#pragma unroll
  for (int e = 0; e < kPack<T>; ++e) out[e] = to_acc(pack.v[e]);
}

template <> __device__ __forceinline__ void unpack<float>(const uint4& raw, float* out) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}

// Two bfloat16 per 32-bit word: one shift or mask each.
template <> __device__ __forceinline__ void unpack<bfloat16_t>(const uint4& raw, float* out) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    out[2 * w] = __uint_as_float(words[w] << 16);
    out[2 * w + 1] = __uint_as_float(words[w] & 0xffff0000u);
  }
}

template <> __device__ __forceinline__ void unpack<float16_t>(const uint4& raw, float* out) {
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

// Not __ldg: the gradient may overwrite the logits.
template <typename T> __device__ __forceinline__ uint4 load_raw(const T* p) {
  return *reinterpret_cast<const uint4*>(p);
}

template <typename T> __device__ __forceinline__ void store_pack(T* p, const Acc<T>* in) {
  Pack<T> pack;
#pragma unroll
  for (int e = 0; e < kPack<T>; ++e) pack.v[e] = from_acc<T>(in[e]);
  *reinterpret_cast<uint4*>(p) = pack.raw;
}

// 16-bit types: two values per conversion instruction (cvt.rn.bf16x2.f32 /
// cvt.rn.f16x2.f32, round to nearest even as from_acc), straight into the
// 32-bit words of the 16-byte store; the lower address holds the first value.
template <typename Pair> __device__ __forceinline__ uint32_t pair_bits(Pair pair) {
  uint32_t bits;
  memcpy(&bits, &pair, sizeof bits);
  return bits;
}

template <> __device__ __forceinline__ void store_pack<bfloat16_t>(bfloat16_t* p, const float* in) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = pair_bits(__floats2bfloat162_rn(in[2 * i], in[2 * i + 1]));
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

template <> __device__ __forceinline__ void store_pack<float16_t>(float16_t* p, const float* in) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = pair_bits(__floats2half2_rn(in[2 * i], in[2 * i + 1]));
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// --- Plan (cuda/plan.h) plus one alignment test ----------------------------------------
// `buffers` are the row-major tensors a kernel reads or writes element-wise.
inline Plan make_plan(const Layout& layout, int element_size, const void* const* buffers, int count) {
  Plan plan = shape_plan(layout, element_size);
  if (layout.inner == 1) {
    const uintptr_t phase = reinterpret_cast<uintptr_t>(buffers[0]) % 16;
    plan.vectorized = true;
    for (int i = 1; i < count; ++i)
      plan.vectorized = plan.vectorized && reinterpret_cast<uintptr_t>(buffers[i]) % 16 == phase;
  }
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
template <typename T> struct RowPointers {
  const T* z;  // logits of the row (or the labels, for a label sum)
  const T* t;  // dense labels of the row, or null
  T* out;      // gradient of the row, or null
  int64_t stride;
};

// Packs per visit: at most 16 values, as many as float's kUnroll packs. A
// 16-bit batch (kUnroll packs of 8) is loaded at once but converted and
// visited a few packs at a time, so it needs float's registers: converting the
// whole batch made the 16-bit kernels spill under their occupancy bound.
template <typename T> constexpr int kVisitPacks = kUnroll * kPack<T> > 16 ? 16 / kPack<T> : kUnroll;

// `count` packs (all kUnroll when kFull) at j0, j0 + step, ...: their loads
// are issued together, so a thread waits for memory once per batch.
template <bool kFull, bool kLabels, bool kWrites, typename T, typename Visit>
__device__ __forceinline__ void visit_packs(const RowPointers<T>& p, int64_t j0, int64_t step, int count,
                                            Visit& visit) {
  using A = Acc<T>;
  constexpr int V = kPack<T>, P = kVisitPacks<T>, N = P * V;
  static_assert(kUnroll % P == 0, "a batch is whole visits");
  if constexpr (P == kUnroll) {  // float, double: the whole batch at once
    A z[N], t[N];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (kFull || u < count) {
        unpack<T>(load_raw(p.z + j0 + u * step), z + u * V);
        if (kLabels) unpack<T>(load_raw(p.t + j0 + u * step), t + u * V);
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
  } else {  // 16-bit types: loads of the whole batch, visits of P packs
    uint4 zr[kUnroll], tr[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      zr[u] = tr[u] = make_uint4(0, 0, 0, 0);
      if (kFull || u < count) {
        zr[u] = load_raw(p.z + j0 + u * step);
        if (kLabels) tr[u] = load_raw(p.t + j0 + u * step);
      }
    }
#pragma unroll
    for (int h = 0; h < kUnroll; h += P) {
      if (kFull || h < count) {
        A z[N], t[N];
#pragma unroll
        for (int u = 0; u < P; ++u) {
          unpack<T>(zr[h + u], z + u * V);  // packs past `count` are zeros, never counted (n below)
          if (kLabels) {
            unpack<T>(tr[h + u], t + u * V);
          } else {
#pragma unroll
            for (int e = 0; e < V; ++e) t[u * V + e] = A(0);
          }
        }
        visit.template operator()<N, V>(z, t, kFull ? N : min(count - h, P) * V, j0 + h * step, step);
        if (kWrites) {
#pragma unroll
          for (int u = 0; u < P; ++u)
            if (kFull || h + u < count) store_pack(p.out + j0 + (h + u) * step, z + u * V);
        }
      }
    }
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
__device__ void walk_slice(const RowPointers<T>& p, int64_t begin, int64_t end, int lane, int group,
                           bool vectorized, Visit& visit) {
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

template <typename A> __device__ RowSums<A> reduce_row_sums(RowSums<A> s, int group, bool mean, bool labels) {
  // Raw storage: __shared__ variables cannot have RowSums' default initialisers.
  __shared__ alignas(RowSums<A>) unsigned char storage[sizeof(RowSums<A>) * (kThreads / kWarp)];
  RowSums<A>* warp_sums = reinterpret_cast<RowSums<A>*>(storage);
  for (int offset = min(group, kWarp) / 2; offset > 0; offset /= 2)
    merge_sums(s, shuffle_down(s, offset, mean, labels));
  if (group <= kWarp) return s;
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) warp_sums[warp] = s;
  __syncthreads();
  if (threadIdx.x % group == 0)
    for (int w = 1; w < group / kWarp; ++w) merge_sums(s, warp_sums[warp + w]);
  return s;
}

// The sums of row r's `splits` chunks (partial[r * splits + c]), merged by one
// whole warp: lane l merges chunks l, l + 32, ... in order, then the lanes
// merge by shuffles, a fixed order. Complete in lane 0.
template <typename A> __device__ RowSums<A> merge_chunks(const RowSums<A>* partial, int64_t r, int splits,
                                                         int lane, bool mean, bool labels) {
  RowSums<A> s;
  for (int c = lane; c < splits; c += kWarp) merge_sums(s, partial[r * splits + c]);
  for (int offset = kWarp / 2; offset > 0; offset /= 2) merge_sums(s, shuffle_down(s, offset, mean, labels));
  return s;
}

// Rows of the merge kernels: one warp each.
constexpr int kRowsPerMergeBlock = kThreads / kWarp;
inline unsigned merge_blocks(int64_t rows) {
  return static_cast<unsigned>(ceil_div(rows, kRowsPerMergeBlock));
}
__device__ __forceinline__ int64_t merge_row() {
  return static_cast<int64_t>(blockIdx.x) * kRowsPerMergeBlock + threadIdx.x / kWarp;
}

template <typename A> __device__ A reduce_sum(A s, int group) {
  __shared__ A warp_sums[kThreads / kWarp];
  for (int offset = min(group, kWarp) / 2; offset > 0; offset /= 2)
    s += __shfl_down_sync(0xffffffffu, s, offset);
  if (group <= kWarp) return s;
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) warp_sums[warp] = s;
  __syncthreads();
  if (threadIdx.x % group == 0)
    for (int w = 1; w < group / kWarp; ++w) s += warp_sums[warp + w];
  return s;
}

// The sum of a row's `count` chunk values, in every thread of the row's group:
// lane l adds values l, l + group, ... in order, then the group sums by a tree
// (a fixed order). Every thread of the block must call it.
template <typename A> __device__ A group_total(const A* values, int count, int lane, int group, bool active) {
  __shared__ A totals[kThreads];
  A sum = 0;
  if (active)
    for (int c = lane; c < count; c += group) sum += values[c];
  sum = reduce_sum(sum, group);
  if (lane == 0) totals[threadIdx.x / group] = sum;
  __syncthreads();
  return totals[threadIdx.x / group];
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

template <int N, typename A, typename Op> __device__ __forceinline__ A tree_reduce(A (&v)[N], Op op) {
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
// With a softcap, the batch is capped first (row_math's softcap_at).
template <typename A, bool kLabels> struct SumsVisitor {
  RowSums<A> sums;
  bool want_mean;
  A inv_classes;
  A cap;  // 0: not capped

  template <int N, int W>
  __device__ __forceinline__ void operator()(const A (&logits)[N], const A (&t)[N], int n, int64_t, int64_t) {
    const A kInf = -negative_infinity<A>();
    A z[N];
#pragma unroll
    for (int e = 0; e < N; ++e) z[e] = cap > 0 ? softcap_at(logits[e], cap).value : logits[e];
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

template <typename A> struct AddVisitor {
  A sum = 0;
  template <int N, int W>
  __device__ __forceinline__ void operator()(const A (&z)[N], const A (&)[N], int n, int64_t, int64_t) {
#pragma unroll
    for (int e = 0; e < N; ++e)
      if (e < n) sum += z[e];
  }
};

// Writes one value everywhere (rows with a NaN or an exactly zero gradient).
template <typename A> struct FillVisitor {
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
// With a softcap, on the capped logits, times the cap's slope.
template <typename A, bool kDense> struct GradientVisitor {
  BackwardCoefficients<A> c;
  SplitLse<A> lse;
  int64_t label;  // sparse: the target class, or -1
  A cap;          // 0: not capped

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
    A slope[N];
#pragma unroll
    for (int e = 0; e < N; ++e) {
      slope[e] = A(1);
      if (cap > 0) {
        const Softcapped<A> capped = softcap_at(z[e], cap);
        z[e] = capped.value;
        slope[e] = capped.slope;
      }
    }
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const A p = softmax(z[e]);
      z[e] = p > A(0.5) ? gradient_from(c.softmax_scale, target[e], log_softmax_at(z[e], lse), p)
                        : c.softmax_scale * p - target[e];
      if (cap > 0) z[e] *= slope[e];
    }
  }
};

}  // namespace
}  // namespace cuda
}  // namespace fused_xent
