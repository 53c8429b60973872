// The one tiled kernel every op runs, and its launcher.
//
// The tensor is a rows x cols matrix in memory order, cut into block_r x block_l tiles exactly as
// the Triton kernels cut it (fused_act/plan.py), so both backends write the same partial-sum
// slots.  A block of 256 threads walks the tiles with a grid-stride loop; its threads form a
// TY x TX grid over a tile, each thread handling VEC consecutive elements of a row with one
// 16-byte load and store per tensor where the data is aligned.  An op is a functor called per
// vector: it loads its inputs, stores its outputs and returns its per-element contributions to
// NP parameter gradients, which the kernel reduces over the tile in a fixed order (warp
// shuffles, then shared memory): deterministic, no atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <initializer_list>
#include <type_traits>
#include <utility>

#include "activations.cuh"
#include "fused_act.h"

namespace fused_act {

// How a kernel is launched; tests/cuda_emu.h replaces it to run the kernels on the CPU.
#ifndef FA_LAUNCH
#define FA_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif

constexpr int THREADS = 256;
// 4 resident blocks (32 warps) an SM: registers capped at 64 a thread, enough bytes in flight
constexpr int MIN_BLOCKS = 4;

// What a launch sums of the op's parameter-gradient terms: nothing (no `partial`, or an op
// without parameters), per row of a tile (ROWS; the row passes) or per column (COLS; the column
// passes).  Each is its own kernel, so the common backward without a parameter gradient neither
// computes the terms nor is held to the registers of the sums.
enum Sums { NO_SUMS = 0, ROW_SUMS = 1, COLUMN_SUMS = 2 };

// The resident blocks a kernel is compiled for: registers are capped at 65536 / (THREADS x
// blocks), 64 at MIN_BLOCKS, 80 at 3, 128 at 2.  An op whose heavier instantiations spill at 64
// (bench/codegen_cuda.py lists every instantiation's registers and spills, and fails on a spill)
// asks for fewer in `Op::min_blocks<VEC, SUMS>()`: a few warps less cost less than local memory
// traffic in every iteration.
template <class Op, int VEC, int SUMS, class = void>
struct BlocksOf {
  static constexpr int value = MIN_BLOCKS;
};
template <class Op, int VEC, int SUMS>
struct BlocksOf<Op, VEC, SUMS, std::void_t<decltype(Op::template min_blocks<VEC, SUMS>())>> {
  static constexpr int value = Op::template min_blocks<VEC, SUMS>();
};
template <class Op, int VEC, int SUMS>
constexpr int min_blocks() { return BlocksOf<Op, VEC, SUMS>::value; }

// An op that stores nothing but its sums (`static constexpr bool SUMS_ONLY = true`, as the batch
// statistics) has no kernel without them: none is instantiated, and a launch without `partial`
// is an error.
template <class Op, class = void>
struct SumsOnly : std::false_type {};
template <class Op>
struct SumsOnly<Op, std::void_t<decltype(Op::SUMS_ONLY)>> : std::bool_constant<Op::SUMS_ONLY> {};

// A centered op (`static constexpr bool CENTERED = true`, NP = 3: the batch statistics) gives
// each lane's count (1, or 0 for no value) and value; the kernel reduces them to each slot's
// count, sum, and sum of squared distances from the slot's own mean (its sum / count), merging
// partial results by Chan et al.'s formula instead of adding them: nothing cancels however far
// the values lie from 0.
template <class Op, class = void>
struct Centered : std::false_type {};
template <class Op>
struct Centered<Op, std::void_t<decltype(Op::CENTERED)>> : std::bool_constant<Op::CENTERED> {};

// ---- storage <-> opmath --------------------------------------------------------------------

template <class T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Explicit conversions: torch builds with the implicit half/bfloat16 conversions disabled.
__device__ __forceinline__ float to_op(float v) { return v; }
__device__ __forceinline__ double to_op(double v) { return v; }
__device__ __forceinline__ float to_op(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_op(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void from_op(float v, float& d) { d = v; }
__device__ __forceinline__ void from_op(double v, double& d) { d = v; }
__device__ __forceinline__ void from_op(float v, __half& d) { d = __float2half_rn(v); }
__device__ __forceinline__ void from_op(float v, __nv_bfloat16& d) { d = __float2bfloat16_rn(v); }

// The builtin type of `BYTES` bytes that a full vector moves as (the __stwb overloads take it).
template <int BYTES>
struct Word;
template <>
struct Word<16> { using type = uint4; };
template <>
struct Word<8> { using type = uint2; };
template <>
struct Word<4> { using type = unsigned; };
template <>
struct Word<2> { using type = unsigned short; };
template <>
struct Word<1> { using type = unsigned char; };

template <class T, int VEC>
using word_t = typename Word<int(sizeof(T)) * VEC>::type;

// The n (<= VEC) elements at p; a full vector is one aligned access.
template <int VEC, class T>
__device__ __forceinline__ void load_raw(const T* p, int n, T (&out)[VEC]) {
  if (n == VEC) {
    const word_t<T, VEC> w = *reinterpret_cast<const word_t<T, VEC>*>(p);
    memcpy(&out, &w, sizeof(w));
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (k < n) out[k] = p[k];
    }
  }
}

template <int VEC, class T>
__device__ __forceinline__ void store_raw(T* p, int n, const T (&in)[VEC]) {
  if (n == VEC) {
    word_t<T, VEC> w;
    memcpy(&w, &in, sizeof(w));
    // nvcc splits a plain store of w into one store per element in these kernels (STG.E, not
    // STG.E.128); __stwb is the same store, with the default cache policy, and stays whole.
    __stwb(reinterpret_cast<word_t<T, VEC>*>(p), w);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (k < n) p[k] = in[k];
    }
  }
}

// Loads upcast to opmath; lanes past n read as 0 (never stored).
template <int VEC, class T, class M>
__device__ __forceinline__ void load(const T* p, int n, M (&out)[VEC]) {
  T raw[VEC];
  load_raw<VEC>(p, n, raw);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = k < n ? to_op(raw[k]) : M(0);
}

template <int VEC, class T, class M>
__device__ __forceinline__ void store(T* p, int n, const M (&in)[VEC]) {
  T raw[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) from_op(in[k], raw[k]);
  store_raw<VEC>(p, n, raw);
}

// An op (elementwise.cu, acon.cu, frelu.cu, batchnorm.cu) names its storage type `Storage`,
// opmath type `M` and number of partials `NP` (parameter-gradient terms, or statistics), holds
// its pointers, and has `template <int VEC> apply(const At&, M (&)[max(NP, 1)][VEC])`.

// ---- geometry ------------------------------------------------------------------------------

struct Geom {
  int64_t rows, cols, channels;
  int32_t layout, block_r, block_l;
  int64_t samples, rows_per_sample, rows_per_batch_item;  // the last 0 unless ROWS per sample
  int64_t col_blocks, row_blocks_per_sample, tiles;
};

inline Geom make_geom(const fa_plan& p) {
  Geom g{};
  g.rows = p.rows;
  g.cols = p.cols;
  g.channels = p.channels;
  g.layout = p.layout;
  g.block_r = p.block_r;
  g.block_l = p.block_l;
  g.samples = p.samples;
  g.rows_per_sample = p.rows / p.samples;
  g.rows_per_batch_item = p.batch > 0 ? p.rows / p.batch : 0;
  g.col_blocks = (p.cols + p.block_l - 1) / p.block_l;
  g.row_blocks_per_sample = (g.rows_per_sample + p.block_r - 1) / p.block_r;
  g.tiles = p.samples * g.row_blocks_per_sample * g.col_blocks;
  return g;
}

// a % b and a / b in 32 bits where both fit (64-bit division is several times slower).
__device__ __forceinline__ int64_t mod64(int64_t a, int64_t b) {
  return (a | b) <= INT32_MAX ? int64_t(uint32_t(a) % uint32_t(b)) : a % b;
}
__device__ __forceinline__ int64_t div64(int64_t a, int64_t b) {
  return (a | b) <= INT32_MAX ? int64_t(uint32_t(a) / uint32_t(b)) : a / b;
}

// Where a vector lies: offset, row, first column, element count, the parameter index of its row
// (ROWS: row % channels) and its sample (per-sample parameters).
struct At {
  int64_t off, row, col, chan, sample;
  int n;
};

// A per-channel parameter of element k of the vector at `at` (layout ROWS or COLS), and a
// per-(sample, channel) one.  A COLS vector is always whole (vector_ok), so element k's index is
// col + k, never past the array: one base pointer and constant offsets (clamping the index of
// elements past n kept a 64-bit address live per element and parameter).
__device__ __forceinline__ int64_t param_index(const At& at, int k, int layout) {
  return layout == FA_ROWS ? at.chan : at.col + k;
}
template <class M>
__device__ __forceinline__ M channel_param(const M* p, const At& at, int k, int layout) {
  return p[param_index(at, k, layout)];
}
template <class M>
__device__ __forceinline__ M sample_param(const M* p, const At& at, int k, int layout,
                                          int64_t channels) {
  return p[at.sample * channels + param_index(at, k, layout)];
}

// ---- reductions over a tile (fixed order: deterministic) -----------------------------------

template <class M>
__device__ __forceinline__ M shfl_xor(M v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }

// (count, sum, M2: squared distances from the mean) b merged into a (Chan et al.): the counts
// and sums add, and M2 gains na nb / (na + nb) times the squared distance between the means.
// An empty side (count 0) leaves the other as it is.  Symmetric in a and b, bit for bit.
template <class M>
__device__ __forceinline__ void chan_merge(M& na, M& sa, M& ma, M nb, M sb, M mb) {
  const M n = na + nb;
  const M d = sb / (nb > M(0) ? nb : M(1)) - sa / (na > M(0) ? na : M(1));
  const M m = ma + mb + d * d * (na * nb / (n > M(0) ? n : M(1)));
  ma = na == M(0) ? mb : nb == M(0) ? ma : m;
  na = n;
  sa = sa + sb;
}

template <class M>
__device__ __forceinline__ void chan_merge(M (&a)[3], const M (&b)[3]) {
  chan_merge(a[0], a[1], a[2], b[0], b[1], b[2]);
}

// ---- the kernel ----------------------------------------------------------------------------

template <class Op, int VEC, int SUMS>
__global__ void __launch_bounds__(THREADS, (min_blocks<Op, VEC, SUMS>()))
    tile_kernel(Op op, Geom g, typename Op::M* partial, int64_t n_partial) {
  using M = typename Op::M;
  constexpr int NP = Op::NP > 0 ? Op::NP : 1;
  const int per_row = g.block_l / VEC;  // vectors in a tile row (block_l is a power of 2 >= VEC)
  const int tx_n = per_row < THREADS ? per_row : THREADS;
  const int ty_n = THREADS / tx_n;
  const int tx = threadIdx.x % tx_n;
  const int ty = threadIdx.x / tx_n;
  static_assert(SUMS == NO_SUMS || Op::NP > 0, "sums of parameter-gradient terms need some");
  constexpr bool reduce = SUMS != NO_SUMS;
  constexpr bool centered = Centered<Op>::value;
  static_assert(!centered || NP == 3, "a centered op's partials: count, sum, M2");

  for (int64_t tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
    const int64_t pid_l = mod64(tile, g.col_blocks);
    const int64_t t = div64(tile, g.col_blocks);
    const int64_t sample = div64(t, g.row_blocks_per_sample);
    const int64_t pid_r = mod64(t, g.row_blocks_per_sample);

    auto locate = [&](int r, int cv, At& at) -> bool {
      const int64_t r_in = pid_r * g.block_r + r;
      const int64_t col = pid_l * g.block_l + int64_t(cv) * VEC;
      if (r >= g.block_r || r_in >= g.rows_per_sample || cv >= per_row || col >= g.cols) {
        return false;
      }
      at.row = sample * g.rows_per_sample + r_in;
      at.col = col;
      at.off = at.row * g.cols + col;
      at.n = g.cols - col < VEC ? int(g.cols - col) : VEC;
      return true;
    };
    auto place_row = [&](At& at) {
      at.chan = g.layout == FA_ROWS ? mod64(at.row, g.channels) : 0;
      at.sample = g.rows_per_batch_item > 0 ? div64(at.row, g.rows_per_batch_item) : sample;
    };

    if constexpr (SUMS != COLUMN_SUMS) {
      // row passes; a ROWS reduction sums each row over the tile's columns
      for (int r0 = 0; r0 < g.block_r; r0 += ty_n) {
        M acc[NP] = {};
        At at{};
        bool row_ok = false;
        for (int c0 = 0; c0 < per_row; c0 += tx_n) {
          if (!locate(r0 + ty, c0 + tx, at)) continue;
          if (!row_ok) place_row(at);
          row_ok = true;
          M d[NP][VEC] = {};
          op.template apply<VEC>(at, d);
          if constexpr (centered) {
            // the vector's lanes are one row's, one slot's: their count, sum and squared
            // distances from their mean, merged into the thread's
            M v[NP] = {};
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              v[0] += d[0][k];
              v[1] += d[1][k];
            }
            const M mean = v[1] / (v[0] > M(0) ? v[0] : M(1));
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const M e = d[1][k] - mean;
              v[2] += d[0][k] > M(0) ? e * e : M(0);
            }
            chan_merge(acc, v);
          } else {
#pragma unroll
            for (int p = 0; p < NP; ++p) {
#pragma unroll
              for (int k = 0; k < VEC; ++k) acc[p] += d[p][k];
            }
          }
        }
        if constexpr (reduce) {
          const int lane = threadIdx.x % 32;
          const int warp = threadIdx.x / 32;
          // the tx_n threads of a tile row are consecutive: lanes of one warp, or whole warps
          const int in_warp = tx_n < 32 ? tx_n : 32;
          if constexpr (centered) {
            for (int o = in_warp / 2; o >= 1; o /= 2) {
              M other[NP];
#pragma unroll
              for (int p = 0; p < NP; ++p) other[p] = shfl_xor(acc[p], o);
              chan_merge(acc, other);
            }
          } else {
#pragma unroll
            for (int p = 0; p < NP; ++p) {
              for (int o = in_warp / 2; o >= 1; o /= 2) acc[p] += shfl_xor(acc[p], o);
            }
          }
          const int64_t slot = pid_l * g.rows + at.row;
          if (tx_n <= 32) {
            if (tx == 0 && row_ok) {
              for (int p = 0; p < NP; ++p) partial[p * n_partial + slot] = acc[p];
            }
          } else {
            __shared__ M warp_sums[NP][THREADS / 32];
            if (lane == 0) {
              for (int p = 0; p < NP; ++p) warp_sums[p][warp] = acc[p];
            }
            __syncthreads();
            if (tx == 0 && row_ok) {
              const int warps = tx_n / 32;
              if constexpr (centered) {
                M s[NP] = {};
                for (int w = 0; w < warps; ++w) {
                  M v[NP];
#pragma unroll
                  for (int p = 0; p < NP; ++p) v[p] = warp_sums[p][ty * warps + w];
                  chan_merge(s, v);
                }
                for (int p = 0; p < NP; ++p) partial[p * n_partial + slot] = s[p];
              } else {
                for (int p = 0; p < NP; ++p) {
                  M s = M(0);
                  for (int w = 0; w < warps; ++w) s += warp_sums[p][ty * warps + w];
                  partial[p * n_partial + slot] = s;
                }
              }
            }
            __syncthreads();
          }
        }
      }
    } else {
      // column passes; a COLS reduction sums each column over the tile's rows.  Each thread
      // sums its VEC columns in its own slots of col_sums rather than in registers: NP * VEC
      // accumulators live across the op's math are what made the heaviest ops spill.
      __shared__ M col_sums[NP][THREADS * VEC];
      const int me = threadIdx.x * VEC;
      for (int c0 = 0; c0 < per_row; c0 += tx_n) {
#pragma unroll
        for (int p = 0; p < NP; ++p) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) col_sums[p][me + k] = M(0);
        }
        bool col_ok = false;
        for (int r0 = 0; r0 < g.block_r; r0 += ty_n) {
          At at{};
          if (!locate(r0 + ty, c0 + tx, at)) continue;
          place_row(at);
          col_ok = true;
          M d[NP][VEC] = {};
          op.template apply<VEC>(at, d);
          if constexpr (centered) {
            // each lane is its own column's: one value merged into that column's (Welford)
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              chan_merge(col_sums[0][me + k], col_sums[1][me + k], col_sums[2][me + k], d[0][k],
                         d[1][k], M(0));
            }
          } else {
#pragma unroll
            for (int p = 0; p < NP; ++p) {
#pragma unroll
              for (int k = 0; k < VEC; ++k) col_sums[p][me + k] += d[p][k];
            }
          }
        }
        M acc[NP][VEC];
#pragma unroll
        for (int p = 0; p < NP; ++p) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[p][k] = col_sums[p][me + k];
        }
        // threads of one column: lanes tx, tx + tx_n, ... of a warp, then one group per warp
        // (tx_n < 32) or per tile row (tx_n >= 32)
        for (int o = tx_n; o < 32; o *= 2) {
          if constexpr (centered) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              M mine[NP], other[NP];
#pragma unroll
              for (int p = 0; p < NP; ++p) {
                mine[p] = acc[p][k];
                other[p] = shfl_xor(acc[p][k], o);
              }
              chan_merge(mine, other);
#pragma unroll
              for (int p = 0; p < NP; ++p) acc[p][k] = mine[p];
            }
          } else {
#pragma unroll
            for (int p = 0; p < NP; ++p) {
#pragma unroll
              for (int k = 0; k < VEC; ++k) acc[p][k] += shfl_xor(acc[p][k], o);
            }
          }
        }
        const int lane = threadIdx.x % 32;
        const int warp = threadIdx.x / 32;
        const int groups = tx_n < 32 ? THREADS / 32 : ty_n;
        const int group = tx_n < 32 ? warp : ty;
        const bool writer = tx_n < 32 ? lane < tx_n : true;
        __syncthreads();  // every thread has read its own slots before the writers reuse them
        if (writer) {
          for (int p = 0; p < NP; ++p) {
            for (int k = 0; k < VEC; ++k) col_sums[p][(group * tx_n + tx) * VEC + k] = acc[p][k];
          }
        }
        __syncthreads();
        // the tile's first row is always valid, so thread (ty = 0, tx) saw every valid column
        if (group == 0 && writer && col_ok) {
          const int64_t col = pid_l * g.block_l + int64_t(c0 + tx) * VEC;
          const int n = g.cols - col < VEC ? int(g.cols - col) : VEC;
          const int64_t row_block = sample * g.row_blocks_per_sample + pid_r;
          const int64_t slot = row_block * g.cols + col;
          if constexpr (centered) {
            for (int k = 0; k < n; ++k) {
              M s[NP] = {};
              for (int w = 0; w < groups; ++w) {
                M v[NP];
#pragma unroll
                for (int p = 0; p < NP; ++p) v[p] = col_sums[p][(w * tx_n + tx) * VEC + k];
                chan_merge(s, v);
              }
              for (int p = 0; p < NP; ++p) partial[p * n_partial + slot + k] = s[p];
            }
          } else {
            for (int p = 0; p < NP; ++p) {
              for (int k = 0; k < n; ++k) {
                M s = M(0);
                for (int w = 0; w < groups; ++w) s += col_sums[p][(w * tx_n + tx) * VEC + k];
                partial[p * n_partial + slot + k] = s;
              }
            }
          }
        }
        __syncthreads();
      }
    }
  }
}

// The two op shapes of an activation, generic over its math `F` (opmath M):
// `F::value(x, at, k)` is f(x) for element k of the vector at `at`;
// `F::grad(x, at, k, terms)` returns df/dx and writes F::NP parameter derivatives to `terms`.

// y = f(x)
template <class T, class F>
struct MapOp {
  using Storage = T;
  using M = opmath_t<T>;
  static constexpr int NP = 0;
  const T* x;
  T* y;
  F f;

  template <int VEC>
  __device__ __forceinline__ void apply(const At& a, M (&)[1][VEC]) const {
    M v[VEC];
    load<VEC>(x + a.off, a.n, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = f.value(v[k], a, k);
    store<VEC>(y + a.off, a.n, v);
  }
};

// dx = g f'(x), and the per-element parameter-gradient terms g df/dp for the tile's reduction
template <class T, class F>
struct GradOp {
  using Storage = T;
  using M = opmath_t<T>;
  static constexpr int NP = F::NP;
  const T* g;
  const T* x;
  T* dx;
  F f;

  template <int VEC, int SUMS>
  static constexpr int min_blocks() { return F::template grad_blocks<VEC, SUMS>(); }

  template <int VEC>
  __device__ __forceinline__ void apply(const At& a, M (&d)[NP][VEC]) const {
    M gv[VEC], xv[VEC];
    load<VEC>(g + a.off, a.n, gv);
    load<VEC>(x + a.off, a.n, xv);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      M terms[NP];
      xv[k] = gv[k] * f.grad(xv[k], a, k, terms);
      // 0 past n: gv is 0 there and every term is finite at x = 0
#pragma unroll
      for (int p = 0; p < NP; ++p) d[p][k] = gv[k] * terms[p];
    }
    store<VEC>(dx + a.off, a.n, xv);
  }
};

// Whether every pointer suits VEC-element accesses of its element size and every row starts on a
// vector boundary (rows `cols` apart, or `row_strides` apart where an op walks strided rows).
// A COLS plan also needs whole vectors in its one row (param_index reads col + k); with one row
// each column sum has one term, so the scalar path gives the same bits.
template <int VEC>
bool vector_ok(const fa_plan& p, std::initializer_list<std::pair<const void*, int>> ptrs,
               std::initializer_list<int64_t> row_strides) {
  if (VEC == 1) return true;
  if (p.block_l % VEC != 0) return false;
  if ((p.rows > 1 || p.layout == FA_COLS) && p.cols % VEC != 0) return false;
  for (const int64_t s : row_strides) {
    if (p.rows > 1 && s % VEC != 0) return false;
  }
  for (const auto& [ptr, size] : ptrs) {
    if (ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % (uintptr_t(size) * VEC) != 0) {
      return false;
    }
  }
  return true;
}

inline int resident_blocks() {
  // per device, read once: cudaDeviceGetAttribute is cheap but not free
  static int cache[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1024;
  if (dev < 0 || dev >= 64) return 1024;
  if (cache[dev] == 0) {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cache[dev] = (sms > 0 ? sms : 128) * (2048 / THREADS);
  }
  return cache[dev];
}

template <class Op, int VEC>
int launch(const Op& op, const fa_plan& plan, typename Op::M* partial, int64_t n_partial,
           void* stream) {
  const Geom g = make_geom(plan);
  if (g.tiles == 0) return 0;
  const int64_t grid = g.tiles < resident_blocks() ? g.tiles : resident_blocks();
  auto go = [&](auto kernel) {
    FA_LAUNCH(kernel, unsigned(grid), THREADS, static_cast<cudaStream_t>(stream), op, g, partial,
              n_partial);
    return int(cudaGetLastError());
  };
  if constexpr (Op::NP > 0) {
    if (partial != nullptr) {
      return plan.layout == FA_COLS ? go(tile_kernel<Op, VEC, COLUMN_SUMS>)
                                    : go(tile_kernel<Op, VEC, ROW_SUMS>);
    }
  }
  if constexpr (SumsOnly<Op>::value) {
    return int(cudaErrorInvalidValue);
  } else {
    return go(tile_kernel<Op, VEC, NO_SUMS>);
  }
}

// The widest vector for T: 16 bytes (fp64 is for gradcheck, run it scalar).
template <class T>
constexpr int vec_of() { return std::is_same_v<T, double> ? 1 : int(16 / sizeof(T)); }

// Launch op with 16-byte vectors where every pointer (with its element size) and row stride
// allows, else scalar.
template <class Op>
int run(const Op& op, const fa_plan& plan, void* stream,
        std::initializer_list<std::pair<const void*, int>> ptrs,
        typename Op::M* partial = nullptr, int64_t n_partial = 0,
        std::initializer_list<int64_t> row_strides = {}) {
  constexpr int V = vec_of<typename Op::Storage>();
  if (vector_ok<V>(plan, ptrs, row_strides)) {
    return launch<Op, V>(op, plan, partial, n_partial, stream);
  }
  return launch<Op, 1>(op, plan, partial, n_partial, stream);
}

// Run f(T{}) for the storage type named by dtype.
template <class F>
int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case FA_F32:
      return f(float{});
    case FA_F16:
      return f(__half{});
    case FA_BF16:
      return f(__nv_bfloat16{});
    case FA_F64:
      return f(double{});
    default:
      return int(cudaErrorInvalidValue);
  }
}

}  // namespace fused_act
