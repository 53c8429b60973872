// The C interface of the CUDA kernels: plain pointers and sizes, no torch types, so the kernel
// sources compile with nvcc alone and only binding.cpp sees torch.
//
// Every tensor is dense and shares x's strides; it is walked in memory order as a matrix of
// `rows` x `cols` in tiles of `block_r` x `block_l` (fused_act/plan.py describes the layouts).
// Parameters (beta, p1, p2, a, b, c, ...) hold opmath values: float for fp32/fp16/bf16 data,
// double for fp64.  Partial sums (parameter gradients, statistics) go to one slot per (column
// block, row) for ROWS and per (row block, column) for COLS, the same slots the Triton kernels
// write; the caller finishes them with one small sum.  Each launcher returns a cudaError_t as
// int (0 = success).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum fa_dtype { FA_F32 = 0, FA_F16 = 1, FA_BF16 = 2, FA_F64 = 3 };
// 0: no parameter tensor (a scalar value); ROWS: a parameter per row; COLS: per column.
enum fa_layout { FA_SCALAR = 0, FA_ROWS = 1, FA_COLS = 2 };

// fused_act/plan.py Plan, field for field (names, order, and its C_TYPES; tests/test_csrc.py
// checks both this struct and FA_PLAN_FIELDS against it).
typedef struct {
  int64_t rows, cols, channels;
  int32_t layout, block_r, block_l;
  int64_t samples;  // rows are split evenly into this many samples, tiled apart
  int64_t batch;    // per-sample parameters in a ROWS plan: sample = row / (rows / batch); else 0
} fa_plan;
enum { FA_PLAN_FIELDS = 8 };  // the members of fa_plan: Plan.fields() has as many

// The partial-sum slots of one quantity under plan p (Plan.partials): one per (column block,
// row) for ROWS and one-channel plans, one per (row block, column) for COLS, each sample's row
// blocks apart.
static inline int64_t fa_partial_slots(fa_plan p) {
  if (p.layout != FA_COLS) return (p.cols + p.block_l - 1) / p.block_l * p.rows;
  return p.samples * ((p.rows / p.samples + p.block_r - 1) / p.block_r) * p.cols;
}

// act: a kernel id of fused_act/registry.py KERNEL_IDS (csrc/activations.cuh act_id); an id
// without an activation is cudaErrorInvalidValue.

int fa_act_forward(const void* x, void* y, int dtype, int act, const void* beta,
                   float beta_value, fa_plan plan, void* stream);
int fa_act_backward(const void* g, const void* x, void* dx, int dtype, int act, const void* beta,
                    float beta_value, void* partial, fa_plan plan, void* stream);

int fa_acon_forward(const void* x, void* y, int dtype, const void* p1, const void* p2,
                    const void* beta, int per_sample, fa_plan plan, void* stream);
// partial: 3 * n_partial slots (dp1, dp2, dbeta), or null when no parameter gradient is needed.
int fa_acon_backward(const void* g, const void* x, void* dx, int dtype, const void* p1,
                     const void* p2, const void* beta, int per_sample, void* partial,
                     int64_t n_partial, fa_plan plan, void* stream);

// The gated activations, out = f(gate) * up, and their backward (dgate = g up f'(gate),
// dup = g f(gate), and g up df/dbeta into `partial` if not null): every tensor is walked as
// `plan.rows` rows of `plan.cols` contiguous elements, each with its own distance between rows,
// `strides` (in argument order: gate, up, out; g, gate, up, dgate, dup), so the halves of a
// packed tensor are read and written in place.  beta: null (the scalar beta_value) or one value.
int fa_glu_forward(const void* gate, const void* up, void* out, const int64_t* strides, int dtype,
                   int act, const void* beta, float beta_value, fa_plan plan, void* stream);
int fa_glu_backward(const void* g, const void* gate, const void* up, void* dgate, void* dup,
                    const int64_t* strides, int dtype, int act, const void* beta,
                    float beta_value, void* partial, fa_plan plan, void* stream);

// code: one byte per element (fused_act/reference.py frelu_max_code), or null.  The max and its
// backward read no parameter: the caller passes a flat plan (fused_act/plan.py flat).
int fa_max_forward(const void* x, const void* t, void* y, void* code, int dtype, fa_plan plan,
                   void* stream);
int fa_max_backward(const void* g, const void* code, void* dx, void* dt, int dtype,
                    fa_plan plan, void* stream);
int fa_max_affine(const void* x, const void* t, const void* a, const void* b, void* y, int dtype,
                  fa_plan plan, void* stream);

// BatchNorm + activation (fused_act/ops/batchnorm.py): c, a, b, k1, k0 and a beta tensor
// hold one opmath value per channel (plan.channels); a plan of one channel is flat.  f is
// activation `act` with its beta, or where p1 is not null ACON-C of per-channel p1, p2 and beta
// (C values each, all three needed; act and beta_value unread).
// fa_stats: per slot, the count of x's values, their sum and the sum of their squared distances
// from their own mean (sum / count) into partial's 3 * n_partial slots, which the caller merges
// (Chan et al.).  fa_affine_act_forward: y = f((x - c) a + b).  fa_affine_act_backward: with dz =
// g f'(z), dx = a dz (+ k1 (x - c) + k0 where k1 is not null) where dx is not null, and where
// partial is not null the partials of dz, dz (x - c) and then of f's parameter gradients into
// its sums * n_partial slots: sums 2 (none), 3 (g df/dbeta) or with ACON-C 5 (g df/dp1,
// g df/dp2, g df/dbeta).
int fa_stats(const void* x, void* partial, int64_t n_partial, int dtype, fa_plan plan,
             void* stream);
int fa_affine_act_forward(const void* x, void* y, int dtype, int act, const void* c, const void* a,
                          const void* b, const void* beta, float beta_value, const void* p1,
                          const void* p2, fa_plan plan, void* stream);
int fa_affine_act_backward(const void* g, const void* x, void* dx, int dtype, int act,
                           const void* c, const void* a, const void* b, const void* beta,
                           float beta_value, const void* p1, const void* p2, const void* k1,
                           const void* k0, void* partial, int sums, int64_t n_partial,
                           fa_plan plan, void* stream);

// An activation quantised to FP8 without writing it (fused_act/kernels.py act_quant): y =
// act(gate), or act(gate) * up where up is not null, in fp32 from fp32/fp16/bf16 inputs (fp64
// is cudaErrorInvalidValue), each walked as plan.rows rows of plan.cols elements `strides`
// (gate, up) apart; q: one byte a code, row-major.  fp8: 0 float8_e4m3fn, 1 float8_e5m2.
// scaling: 0 tensor (q = y / the fp32 at scales), 1 row (an fp32 scale a row into scales),
// 2 block (an E8M0 byte a `block` elements of a row into scales), 3 amax (no q: one fp32 partial
// max of |y| a plan tile into scales, NaN if any y is).  A fused_act/plan.py quant_plan.
// Where beta is not null, f reads per-channel parameters, plan.channels floats each: swish
// (act) with the tensor beta, or where p1 and p2 are not null (up null) ACON-C of p1, p2 and
// beta (act unread); a row's channel is its column (plan.layout FA_COLS) or (row / run) %
// channels.  With up, beta (swish's) is one float (plan.channels 1).
int fa_act_quant(const void* gate, const void* up, void* q, void* scales, const int64_t* strides,
                 int dtype, int act, float beta_value, int fp8, int scaling, int block,
                 const void* beta, const void* p1, const void* p2, int64_t run, fa_plan plan,
                 void* stream);

// fp32 y (rows x cols, contiguous) quantised to FP8 as fa_act_quant quantises its y: q one byte
// a code, row-major; fp8 and scaling (tensor, row, block) its selectors.  Tensor scaling divides
// by *scale where scale is not null (the caller's), else by the scale of the amax of all of y,
// written to scales.  The CPU kernels only (cpu.cpp): the quantisation of activations their
// kernels wrote.
int fa_quantize(const float* y, void* q, void* scales, const float* scale, int fp8, int scaling,
                int block, int64_t rows, int64_t cols);

// BatchNorm's training backward, the CPU kernels only (cpu.cpp): with dz = g f'(z), the
// per-channel sums s0 = sum dz and s1 = sum dz (x - c) into sums (s0's C values, then s1's),
// and dx = a dz + k1 (x - c) + k0 with k1 = -a invstd^2 s1 / m and k0 = -a s0 / m (m = the
// elements per channel), f' evaluated once (dz kept in opmath between the passes).  f is
// activation `act` with the float beta_value.
int fa_batch_norm_backward(const void* g, const void* x, void* dx, int dtype, int act,
                           const void* c, const void* a, const void* b, const void* invstd,
                           float beta_value, void* sums, fa_plan plan);

const char* fa_error_string(int err);

#ifdef __cplusplus
}
#endif
