// An activation fused with FP8 quantisation (fa_act_quant): q = quantise(act(gate) [* up]) with
// y in fp32 as elementwise.cu computes it and never written, bit for bit as
// fused_act/reference.py quantize_fp8 and the Triton kernels (triton_kernels/quant.py) make it.
//
// * amaxes are integer maxima of the bits of |y|: for non-negative floats the integer order is
//   the float order with every NaN above inf, so the max is exact, independent of order, and
//   propagates NaN with no test of its own.
// * Scales and q divide with div_rn (IEEE); fp32 -> fp8 is fp8_code, integer code shared by
//   host and device (fp8.cuh, shared with the CPU quantiser), so the CPU emulation runs the very
//   encoder a GPU does.
//   __nv_cvt_float_to_fp8(v, __NV_SATFINITE, ...) rounds the same way, but keeps a NaN's sign
//   (0xFF for a negative one) where the reference writes 0x7F for every NaN.
// * Swish with a tensor beta and ACON-C read their per-channel parameters (ChannelSource) in
//   the same kernels; gated swish its one-value tensor beta (GatedBetaSource).
// * Two kernels: rows (one block a row, y held in registers up to ROW_HOLD elements, else
//   walked twice, the activation recomputed) and tiles (the plan's block_r x block_l tiles, a
//   tile held 8 values a thread: tensor scales, MX block scales and per-tile amax partials).
#include "act_math.cuh"
#include "fp8.cuh"

namespace fused_act {

// act(gate) (* up) in fp32 at (row, col) with beta b, each input `stride` elements a row: the
// value of Source and of GatedBetaSource
template <int ACT, bool GATED, class T>
__device__ __forceinline__ float act_y(const T* gate, const T* up, int64_t s_gate, int64_t s_up,
                                       int64_t row, int64_t col, float b) {
  float v = act_fwd<ACT>(to_op(gate[row * s_gate + col]), b);
  if constexpr (GATED) v = v * to_op(up[row * s_up + col]);
  return v;
}

// y = act(gate) (* up) in fp32 at (row, col), each input `stride` elements a row
template <class T, int ACT, bool GATED>
struct Source {
  const T* gate;
  const T* up;
  int64_t s_gate, s_up;
  float beta;

  __device__ __forceinline__ float y(int64_t row, int64_t col) const {
    return act_y<ACT, GATED>(gate, up, s_gate, s_up, row, col, beta);
  }
};

// y = swish(gate) * up in fp32 at (row, col) with the gated op's tensor beta (one opmath float,
// read on the device: no host sync), as elementwise.cu's GluOp reads it
template <class T>
struct GatedBetaSource {
  const T* gate;
  const T* up;
  int64_t s_gate, s_up;
  const float* beta;

  __device__ __forceinline__ float y(int64_t row, int64_t col) const {
    return act_y<ACT_TENSOR_BETA, true>(gate, up, s_gate, s_up, row, col, *beta);
  }
};

// y = f(gate) in fp32 at (row, col) with per-channel parameters (opmath floats, `channels` of
// them): swish with a tensor beta, or (ACON) ACON-C of p1, p2 and beta, as elementwise.cu and
// acon.cu compute them.  A row's channel is the column (by_col: x is (N, C)) or, x being
// (N, C, *inner) walked by rows of its last dim, (row / run) % channels.
template <class T, bool ACON>
struct ChannelSource {
  const T* gate;
  int64_t s_gate;
  const float* beta;
  const float* p1;
  const float* p2;
  int64_t run, channels;
  bool by_col;

  __device__ __forceinline__ float y(int64_t row, int64_t col) const {
    const int64_t c = by_col ? col : row / run % channels;
    const float x = to_op(gate[row * s_gate + col]);
    if constexpr (ACON) {
      const float q2 = p2[c];
      return acon_c_fwd(x, p1[c] - q2, q2, beta[c]);
    } else {
      return act_fwd<ACT_TENSOR_BETA>(x, beta[c]);
    }
  }
};

constexpr int Q_THREADS = 256;
constexpr int TILE_MAX = 2048;               // fused_act/plan.py BLOCK: the largest tile
constexpr int PER = TILE_MAX / Q_THREADS;    // tile values a thread holds
constexpr int ROW_HOLD = 8192;               // 32 values a thread (the Triton kernel, at
                                             // 16 warps, holds plan.py's ROW_HOLD = 16384)
constexpr int HELD = ROW_HOLD / Q_THREADS;   // row values a thread holds

// The max of every thread's v, in every thread; `warp_max` is the block's shared scratch.
__device__ __forceinline__ int block_max(int v, int* warp_max) {
  for (int o = 1; o < 32; o *= 2) v = imax(v, shfl_xor(v, o));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = v;
  __syncthreads();
  for (int w = 0; w < Q_THREADS / 32; ++w) v = imax(v, warp_max[w]);
  __syncthreads();  // read before the next row writes
  return v;
}

// Row scaling: one block a row (rows walked grid-stride), a scale a row.  HOLD: the row fits in
// HELD values a thread, y computed once; else two walks, the second recomputing y, since held
// values of a longer row would spill.
template <class S, int FP8, bool HOLD>
__global__ void __launch_bounds__(Q_THREADS, MIN_BLOCKS)
    quant_row_kernel(S src, uint8_t* q, float* scales, int64_t rows, int64_t cols) {
  __shared__ int warp_max[Q_THREADS / 32];
  const int tid = threadIdx.x;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    uint8_t* qrow = q + row * cols;
    int amax = 0;
    float held[HOLD ? HELD : 1];
    if constexpr (HOLD) {
#pragma unroll
      for (int j = 0; j < HELD; ++j) {
        const int64_t c = int64_t(j) * Q_THREADS + tid;
        held[j] = c < cols ? src.y(row, c) : 0.0f;
        amax = imax(amax, abs_bits(held[j]));
      }
    } else {
      for (int64_t c = tid; c < cols; c += Q_THREADS) {
        amax = imax(amax, abs_bits(src.y(row, c)));
      }
    }
    const float scale = row_scale<FP8>(block_max(amax, warp_max));
    if constexpr (HOLD) {
#pragma unroll
      for (int j = 0; j < HELD; ++j) {
        const int64_t c = int64_t(j) * Q_THREADS + tid;
        if (c < cols) qrow[c] = fp8_code<FP8>(div_rn(held[j], scale));
      }
    } else {
      for (int64_t c = tid; c < cols; c += Q_THREADS) {
        qrow[c] = fp8_code<FP8>(div_rn(src.y(row, c), scale));
      }
    }
    if (tid == 0) scales[row] = scale;
  }
}

struct QuantGeom {
  int64_t rows, cols, col_blocks, tiles;
  int block_r, block_l, group;
};

// The max over each aligned run of `span` (a power of two) tile values, in every value of the
// run.  Value j of thread t is the tile's element j * Q_THREADS + t, so a butterfly over the
// element's bits is lane shuffles below 32, shared memory up to Q_THREADS, and the thread's own
// values above.  Every thread takes the same steps: the barriers and shuffles meet.
__device__ __forceinline__ void run_max(int (&b)[PER], int span, int (*exch)[Q_THREADS]) {
  const int tid = threadIdx.x;
  for (int s = 1; s < span && s < 32; s *= 2) {
#pragma unroll
    for (int j = 0; j < PER; ++j) b[j] = imax(b[j], shfl_xor(b[j], s));
  }
  for (int s = 32; s < span && s < Q_THREADS; s *= 2) {
#pragma unroll
    for (int j = 0; j < PER; ++j) exch[j][tid] = b[j];
    __syncthreads();
#pragma unroll
    for (int j = 0; j < PER; ++j) b[j] = imax(b[j], exch[j][tid ^ s]);
    __syncthreads();
  }
  // max is idempotent: updating b[j] in place before b[j ^ k] reads it changes nothing
#pragma unroll
  for (int k = 1; k < PER; k *= 2) {
    if (k * Q_THREADS < span) {
#pragma unroll
      for (int j = 0; j < PER; ++j) b[j] = imax(b[j], b[j ^ k]);
    }
  }
}

// Tensor scaling (q = y / the scale at `scales`), MX block scaling (an E8M0 byte a `group`
// elements of a row, q = y 2^-e) and the amax pass (one partial max of |y| a tile, as fp32
// bits) over the plan's tiles, a tile at a time (grid-stride, tiles in the Triton kernels'
// order), y computed once.
// The tensor and block passes keep a tile's y and |y| bits live across the activations: capped
// at 64 registers (MIN_BLOCKS) they spill, so they take 2 resident blocks (128).
template <int MODE>
constexpr int tile_blocks() { return MODE == Q_AMAX ? MIN_BLOCKS : 2; }

template <class S, int FP8, int MODE>
__global__ void __launch_bounds__(Q_THREADS, tile_blocks<MODE>())
    quant_tile_kernel(S src, uint8_t* q, void* scales, QuantGeom g) {
  __shared__ int exch[MODE == Q_TENSOR ? 1 : PER][Q_THREADS];
  const int tid = threadIdx.x;
  const int size = g.block_r * g.block_l;
  float scale = 0.0f;
  if constexpr (MODE == Q_TENSOR) scale = *static_cast<const float*>(scales);
  for (int64_t tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
    const int64_t r0 = tile / g.col_blocks * g.block_r;
    const int64_t c0 = tile % g.col_blocks * g.block_l;
    // element j of this thread: tile row e / block_l, column e % block_l
    auto where = [&](int j, int64_t& row, int64_t& col) -> bool {
      const int e = j * Q_THREADS + tid;
      row = r0 + e / g.block_l;
      col = c0 + e % g.block_l;
      return e < size && row < g.rows && col < g.cols;
    };
    float y[PER];
    int b[PER];
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      int64_t row, col;
      y[j] = where(j, row, col) ? src.y(row, col) : 0.0f;
      b[j] = abs_bits(y[j]);
    }
    if constexpr (MODE == Q_TENSOR) {
#pragma unroll
      for (int j = 0; j < PER; ++j) {
        int64_t row, col;
        if (where(j, row, col)) q[row * g.cols + col] = fp8_code<FP8>(div_rn(y[j], scale));
      }
    } else if constexpr (MODE == Q_AMAX) {
      run_max(b, size, exch);
      if (tid == 0) static_cast<float*>(scales)[tile] = float_of(uint32_t(b[0]));
    } else {
      static_assert(MODE == Q_BLOCK, "quant_tile_kernel: unknown scaling");
      // block_l is a multiple of group: a group never straddles two tile rows or tiles
      run_max(b, g.group, exch);
      uint8_t* bytes = static_cast<uint8_t*>(scales);
#pragma unroll
      for (int j = 0; j < PER; ++j) {
        int64_t row, col;
        if (!where(j, row, col)) continue;
        float mult;
        const uint8_t byte = mx_byte<FP8>(b[j], mult);
        q[row * g.cols + col] = mx_code<FP8>(y[j], byte, mult);
        if (col % g.group == 0) bytes[row * (g.cols / g.group) + col / g.group] = byte;
      }
    }
  }
}

template <class S, int FP8>
int quant_launch(const S& src, void* q, void* scales, int scaling, int group, const fa_plan& p,
                 void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  auto u8 = static_cast<uint8_t*>(q);
  auto go = [&](auto kernel, int64_t units, auto... args) {
    if (units == 0) return 0;
    const int64_t grid = units < resident_blocks() ? units : resident_blocks();
    FA_LAUNCH(kernel, unsigned(grid), Q_THREADS, s, src, u8, args...);
    return int(cudaGetLastError());
  };
  if (scaling == Q_ROW) {
    auto sc = static_cast<float*>(scales);
    return p.cols <= ROW_HOLD ? go(quant_row_kernel<S, FP8, true>, p.rows, sc, p.rows, p.cols)
                              : go(quant_row_kernel<S, FP8, false>, p.rows, sc, p.rows, p.cols);
  }
  if (int64_t(p.block_r) * p.block_l > TILE_MAX || p.block_l % group != 0) {
    return int(cudaErrorInvalidValue);
  }
  const int64_t col_blocks = (p.cols + p.block_l - 1) / p.block_l;
  const QuantGeom g{p.rows, p.cols, col_blocks, (p.rows + p.block_r - 1) / p.block_r * col_blocks,
                    p.block_r, p.block_l, group};
  switch (scaling) {
    case Q_TENSOR:
      return go(quant_tile_kernel<S, FP8, Q_TENSOR>, g.tiles, scales, g);
    case Q_BLOCK:
      return go(quant_tile_kernel<S, FP8, Q_BLOCK>, g.tiles, scales, g);
    case Q_AMAX:
      return go(quant_tile_kernel<S, FP8, Q_AMAX>, g.tiles, scales, g);
    default:
      return int(cudaErrorInvalidValue);
  }
}

template <class S>
int launch_format(const S& src, void* q, void* scales, int fp8, int scaling, int group,
                  const fa_plan& p, void* stream) {
  return fp8 == E4M3   ? quant_launch<S, E4M3>(src, q, scales, scaling, group, p, stream)
         : fp8 == E5M2 ? quant_launch<S, E5M2>(src, q, scales, scaling, group, p, stream)
                       : int(cudaErrorInvalidValue);
}

template <int ACT, class T>
int act_quant(const void* gate, const void* up, void* q, void* scales, const int64_t* strides,
              float beta_value, int fp8, int scaling, int group, const fa_plan& p,
              void* stream) {
  auto with = [&](auto gated) {
    const Source<T, ACT, decltype(gated)::value> src{static_cast<const T*>(gate),
                                                     static_cast<const T*>(up), strides[0],
                                                     strides[1], beta_value};
    return launch_format<decltype(src)>(src, q, scales, fp8, scaling, group, p, stream);
  };
  return up == nullptr ? with(std::false_type{}) : with(std::true_type{});
}

template <class T>
int channel_quant(const void* gate, const void* up, void* q, void* scales,
                  const int64_t* strides, const void* beta, const void* p1, const void* p2,
                  int64_t run, int fp8, int scaling, int group, const fa_plan& p, void* stream) {
  if (up != nullptr) {
    const GatedBetaSource<T> src{static_cast<const T*>(gate), static_cast<const T*>(up),
                                 strides[0], strides[1], static_cast<const float*>(beta)};
    return launch_format<decltype(src)>(src, q, scales, fp8, scaling, group, p, stream);
  }
  auto with = [&](auto acon) {
    const ChannelSource<T, decltype(acon)::value> src{
        static_cast<const T*>(gate), strides[0], static_cast<const float*>(beta),
        static_cast<const float*>(p1), static_cast<const float*>(p2), run, p.channels,
        p.layout == FA_COLS};
    return launch_format<decltype(src)>(src, q, scales, fp8, scaling, group, p, stream);
  };
  return p1 == nullptr ? with(std::false_type{}) : with(std::true_type{});
}

}  // namespace fused_act

using namespace fused_act;

extern "C" int fa_act_quant(const void* gate, const void* up, void* q, void* scales,
                            const int64_t* strides, int dtype, int act, float beta_value, int fp8,
                            int scaling, int block, const void* beta, const void* p1,
                            const void* p2, int64_t run, fa_plan plan, void* stream) {
  if (plan.samples != 1 || block < 1) return int(cudaErrorInvalidValue);
  if (beta != nullptr) {
    // per-channel parameters: swish or (p1 and p2 given, elementwise) ACON-C; gated: swish
    // with one beta value
    if ((p1 == nullptr) != (p2 == nullptr) || (p1 == nullptr && act != ACT_TENSOR_BETA) || run < 1 ||
        plan.channels < 1 || (up != nullptr && (p1 != nullptr || plan.channels != 1))) {
      return int(cudaErrorInvalidValue);
    }
    switch (dtype) {
      case FA_F32:
        return channel_quant<float>(gate, up, q, scales, strides, beta, p1, p2, run, fp8,
                                    scaling, block, plan, stream);
      case FA_F16:
        return channel_quant<__half>(gate, up, q, scales, strides, beta, p1, p2, run, fp8,
                                     scaling, block, plan, stream);
      case FA_BF16:
        return channel_quant<__nv_bfloat16>(gate, up, q, scales, strides, beta, p1, p2, run,
                                            fp8, scaling, block, plan, stream);
      default:
        return int(cudaErrorInvalidValue);
    }
  }
  return dispatch_act(act, [&](auto a) {
    constexpr int ACT = decltype(a)::value;
    switch (dtype) {
      case FA_F32:
        return act_quant<ACT, float>(gate, up, q, scales, strides, beta_value, fp8, scaling,
                                     block, plan, stream);
      case FA_F16:
        return act_quant<ACT, __half>(gate, up, q, scales, strides, beta_value, fp8, scaling,
                                      block, plan, stream);
      case FA_BF16:
        return act_quant<ACT, __nv_bfloat16>(gate, up, q, scales, strides, beta_value, fp8,
                                             scaling, block, plan, stream);
      default:  // fp64 takes the reference: its fp32 value is what quantize_fp8 reads
        return int(cudaErrorInvalidValue);
    }
  });
}
