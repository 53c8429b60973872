// The torch side of the kernels: checks what reaches them, runs them on the tensors' device
// (and current stream), and turns a launch error into a Python exception.  fused_act/_cuda.py
// lays the tensors out (fused_act/plan.py) and allocates the outputs; the kernels see raw
// pointers only (fused_act.h).  Built with the CUDA kernels into fused_act._C, and with FA_CPU
// beside cpu.cpp into the CPU kernels' extension (fused_act/_cpu.py), which need no device guard
// and no stream.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "fused_act.h"

#ifdef FA_CPU
// the eager nodes (EagerNode)
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/csrc/jit/frontend/tracer.h>

namespace {
constexpr const char* KIND = "CPU";
constexpr auto DEVICE = at::kCPU;
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
void* stream_of(const at::Tensor&) { return nullptr; }
}  // namespace
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
namespace {
constexpr const char* KIND = "CUDA";
constexpr auto DEVICE = at::kCUDA;
using DeviceGuard = c10::cuda::CUDAGuard;
void* stream_of(const at::Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}
}  // namespace
#endif

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return FA_F32;
    case at::kHalf:
      return FA_F16;
    case at::kBFloat16:
      return FA_BF16;
    case at::kDouble:
      return FA_F64;
    default:
      TORCH_CHECK(false, "fused_act ", KIND, " kernels: unsupported dtype ", t.scalar_type());
  }
}

// Every tensor on x's device (CUDA, or CPU for FA_CPU); data in x's dtype, parameters in its
// opmath dtype.
// A tensor whose memory a kernel may read: a subclass that dispatches itself (Python key)
// or a transform's wrapper has no storage of its own, and its data pointer is not its data;
// the memory of a negative view (or a conjugate one) holds the negation of its values. Every
// path resolves such a view before a kernel: one reaching here is a bug, not garbage.
void check_memory(const Tensor& t) {
  TORCH_CHECK(t.defined() && t.has_storage() && !t.key_set().has(c10::DispatchKey::Python),
              "fused_act ", KIND, " kernels: a tensor without plain storage of its own (a tensor "
              "subclass or a transform's wrapper) cannot reach a kernel");
  TORCH_CHECK(!t.is_neg() && !t.is_conj(), "fused_act ", KIND, " kernels: internal error, "
              "please report it: a negative or conjugate view (its memory holds other values "
              "than it reads as) reached a kernel");
}

// x's opmath dtype, which parameters and partial sums are kept in (plan.accumulator)
at::ScalarType accumulator(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check(const Tensor& x, std::initializer_list<const Tensor*> data,
           std::initializer_list<const Tensor*> params) {
  TORCH_CHECK(x.device().type() == DEVICE, "fused_act ", KIND, " kernels need ", KIND,
              " tensors, got ", x.device());
  check_memory(x);
  for (const Tensor* t : data) check_memory(*t);
  for (const Tensor* t : params) check_memory(*t);
  const auto op = accumulator(x);
  for (const Tensor* t : data) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == x.scalar_type(),
                "fused_act ", KIND, " kernels: a tensor on ", t->device(), " of ", t->scalar_type(),
                " beside x on ", x.device(), " of ", x.scalar_type());
  }
  for (const Tensor* t : params) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == op && t->is_contiguous(),
                "fused_act ", KIND, " kernels: parameters must be contiguous ", op, " on ", x.device());
  }
}

// fused_act/plan.py Plan.fields(), in fa_plan's order (a member missing here is a
// -Wmissing-field-initializers error, one too many a compile error).
fa_plan to_plan(c10::IntArrayRef p) {
  TORCH_CHECK(p.size() == FA_PLAN_FIELDS, "fused_act ", KIND, " kernels: a plan has ", FA_PLAN_FIELDS,
              " fields, got ", p.size());
  return fa_plan{p[0], p[1], p[2], int32_t(p[3]), int32_t(p[4]), int32_t(p[5]), p[6], p[7]};
}

void raise_if(int err, const char* what) {
  TORCH_CHECK(err == 0, "fused_act ", KIND, " kernel ", what, " failed: ", fa_error_string(err));
}

const void* ptr(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

void act_forward(const Tensor& x, Tensor& y, int64_t act, const OptTensor& beta,
                 double beta_value, const std::vector<int64_t>& plan) {
  check(x, {&y}, {});
  if (beta) check(x, {}, {&*beta});
  const DeviceGuard guard(x.device());
  raise_if(fa_act_forward(x.data_ptr(), y.data_ptr(), dtype_code(x), int(act), ptr(beta),
                          float(beta_value), to_plan(plan), stream_of(x)),
           "act_forward");
}

void act_backward(const Tensor& g, const Tensor& x, Tensor& dx, int64_t act,
                  const OptTensor& beta, double beta_value, const OptTensor& partial,
                  const std::vector<int64_t>& plan) {
  check(x, {&g, &dx}, {});
  if (beta) check(x, {}, {&*beta});
  if (partial) check(x, {}, {&*partial});
  const DeviceGuard guard(x.device());
  raise_if(fa_act_backward(g.data_ptr(), x.data_ptr(), dx.data_ptr(), dtype_code(x), int(act),
                           ptr(beta), float(beta_value), partial ? partial->data_ptr() : nullptr,
                           to_plan(plan), stream_of(x)),
           "act_backward");
}

// The gated ops' row strides: one per tensor, as fused_act.h's fa_glu_* read them.
const int64_t* row_strides(const std::vector<int64_t>& strides, size_t n) {
  TORCH_CHECK(strides.size() == n, "fused_act ", KIND, " kernels: ", n, " row strides expected, got ",
              strides.size());
  return strides.data();
}

void glu_forward(const Tensor& gate, const Tensor& up, Tensor& out,
                 const std::vector<int64_t>& strides, int64_t act, const OptTensor& beta,
                 double beta_value, const std::vector<int64_t>& plan) {
  check(gate, {&up, &out}, {});
  if (beta) check(gate, {}, {&*beta});
  const DeviceGuard guard(gate.device());
  raise_if(fa_glu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), row_strides(strides, 3),
                          dtype_code(gate), int(act), ptr(beta), float(beta_value), to_plan(plan),
                          stream_of(gate)),
           "glu_forward");
}

void glu_backward(const Tensor& g, const Tensor& gate, const Tensor& up, Tensor& dgate,
                  Tensor& dup, const std::vector<int64_t>& strides, int64_t act,
                  const OptTensor& beta, double beta_value, const OptTensor& partial,
                  const std::vector<int64_t>& plan) {
  check(gate, {&g, &up, &dgate, &dup}, {});
  if (beta) check(gate, {}, {&*beta});
  if (partial) check(gate, {}, {&*partial});
  const DeviceGuard guard(gate.device());
  raise_if(fa_glu_backward(g.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(),
                           dup.data_ptr(), row_strides(strides, 5), dtype_code(gate), int(act),
                           ptr(beta), float(beta_value), partial ? partial->data_ptr() : nullptr,
                           to_plan(plan), stream_of(gate)),
           "glu_backward");
}

void acon_forward(const Tensor& x, Tensor& y, const Tensor& p1, const Tensor& p2,
                  const Tensor& beta, bool per_sample, const std::vector<int64_t>& plan) {
  check(x, {&y}, {&p1, &p2, &beta});
  const DeviceGuard guard(x.device());
  raise_if(fa_acon_forward(x.data_ptr(), y.data_ptr(), dtype_code(x), p1.data_ptr(),
                           p2.data_ptr(), beta.data_ptr(), per_sample, to_plan(plan),
                           stream_of(x)),
           "acon_forward");
}

void acon_backward(const Tensor& g, const Tensor& x, Tensor& dx, const Tensor& p1,
                   const Tensor& p2, const Tensor& beta, bool per_sample,
                   const OptTensor& partial, int64_t n_partial,
                   const std::vector<int64_t>& plan) {
  check(x, {&g, &dx}, {&p1, &p2, &beta});
  if (partial) {
    check(x, {}, {&*partial});
    TORCH_CHECK(partial->numel() >= 3 * n_partial, "fused_act: partial buffer too small");
  }
  const DeviceGuard guard(x.device());
  raise_if(fa_acon_backward(g.data_ptr(), x.data_ptr(), dx.data_ptr(), dtype_code(x),
                            p1.data_ptr(), p2.data_ptr(), beta.data_ptr(), per_sample,
                            partial ? partial->data_ptr() : nullptr, n_partial, to_plan(plan),
                            stream_of(x)),
           "acon_backward");
}

// A buffer of partial sums (fused_act/ops/batchnorm.py): one row of n_partial slots a quantity,
// min_rows to max_rows of them
void check_partial(const Tensor& x, const Tensor& partial, int64_t min_rows, int64_t max_rows,
                   int64_t n_partial) {
  check(x, {}, {&partial});
  TORCH_CHECK(partial.dim() == 2 && partial.size(0) >= min_rows && partial.size(0) <= max_rows &&
                  partial.size(1) == n_partial,
              "fused_act ", KIND, " kernels: a partial-sum buffer of ", min_rows,
              min_rows == max_rows ? "" : " to " + std::to_string(max_rows), " rows of ", n_partial,
              " slots expected, got ", partial.sizes());
}

void stats(const Tensor& x, Tensor& partial, int64_t n_partial,
           const std::vector<int64_t>& plan) {
  check_partial(x, partial, 3, 3, n_partial);
  const DeviceGuard guard(x.device());
  raise_if(fa_stats(x.data_ptr(), partial.data_ptr(), n_partial, dtype_code(x), to_plan(plan),
                    stream_of(x)),
           "stats");
}

// ACON-C's p1 and p2 (both or neither; with them, beta too): the rows of parameter gradients
// after dz and dz (x - c) are then 3, else 1 (beta's)
int64_t check_acon(const Tensor& x, const OptTensor& beta, const OptTensor& p1,
                   const OptTensor& p2) {
  TORCH_CHECK(p1.has_value() == p2.has_value(), "fused_act ", KIND,
              " kernels: ACON-C needs both p1 and p2");
  if (!p1) return 1;
  TORCH_CHECK(beta.has_value(), "fused_act ", KIND, " kernels: ACON-C needs a beta tensor");
  check(x, {}, {&*p1, &*p2});
  return 3;
}

void affine_act_forward(const Tensor& x, Tensor& y, int64_t act, const Tensor& c,
                        const Tensor& a, const Tensor& b, const OptTensor& beta,
                        double beta_value, const OptTensor& p1, const OptTensor& p2,
                        const std::vector<int64_t>& plan) {
  check(x, {&y}, {&c, &a, &b});
  if (beta) check(x, {}, {&*beta});
  check_acon(x, beta, p1, p2);
  const DeviceGuard guard(x.device());
  raise_if(fa_affine_act_forward(x.data_ptr(), y.data_ptr(), dtype_code(x), int(act),
                                 c.data_ptr(), a.data_ptr(), b.data_ptr(), ptr(beta),
                                 float(beta_value), ptr(p1), ptr(p2), to_plan(plan),
                                 stream_of(x)),
           "affine_act_forward");
}

// dx, k (k1 and k0 together), partial and ACON-C's (p1, p2) each optional, as
// fused_act/kernels.py's affine_act_backward takes them
void affine_act_backward(const Tensor& g, const Tensor& x, const OptTensor& dx, int64_t act,
                         const Tensor& c, const Tensor& a, const Tensor& b,
                         const OptTensor& beta, double beta_value, const OptTensor& p1,
                         const OptTensor& p2, const OptTensor& k1,
                         const OptTensor& k0, const OptTensor& partial, int64_t n_partial,
                         const std::vector<int64_t>& plan) {
  check(x, {&g}, {&c, &a, &b});
  if (dx) check(x, {&*dx}, {});
  if (beta) check(x, {}, {&*beta});
  TORCH_CHECK(k1.has_value() == k0.has_value(), "fused_act ", KIND,
              " kernels: the correction needs both k1 and k0");
  if (k1) check(x, {}, {&*k1, &*k0});
  const int64_t extra = check_acon(x, beta, p1, p2);
  if (partial) {
    check_partial(x, *partial, 2, 2 + extra, n_partial);
    TORCH_CHECK(partial->size(0) == 2 || partial->size(0) == 2 + extra, "fused_act ", KIND,
                " kernels: a partial-sum buffer of 2 or ", 2 + extra, " rows expected, got ",
                partial->sizes());
  }
  const DeviceGuard guard(x.device());
  raise_if(fa_affine_act_backward(g.data_ptr(), x.data_ptr(), dx ? dx->data_ptr() : nullptr,
                                  dtype_code(x), int(act), c.data_ptr(), a.data_ptr(),
                                  b.data_ptr(), ptr(beta), float(beta_value), ptr(p1), ptr(p2),
                                  ptr(k1), ptr(k0),
                                  partial ? partial->data_ptr() : nullptr,
                                  partial ? int(partial->size(0)) : 0, n_partial, to_plan(plan),
                                  stream_of(x)),
           "affine_act_backward");
}

void check_code(const Tensor& x, const Tensor& code) {
  TORCH_CHECK(code.device() == x.device() && code.scalar_type() == at::kByte &&
                  code.numel() == x.numel(),
              "fused_act ", KIND, " kernels: the win code must be uint8 beside x");
}

void max_forward(const Tensor& x, const Tensor& t, Tensor& y, const OptTensor& code,
                 const std::vector<int64_t>& plan) {
  check(x, {&t, &y}, {});
  if (code) check_code(x, *code);
  const DeviceGuard guard(x.device());
  raise_if(fa_max_forward(x.data_ptr(), t.data_ptr(), y.data_ptr(),
                          code ? code->data_ptr() : nullptr, dtype_code(x), to_plan(plan),
                          stream_of(x)),
           "max_forward");
}

void max_backward(const Tensor& g, const Tensor& code, Tensor& dx, Tensor& dt,
                  const std::vector<int64_t>& plan) {
  check(g, {&dx, &dt}, {});
  check_code(g, code);
  const DeviceGuard guard(g.device());
  raise_if(fa_max_backward(g.data_ptr(), code.data_ptr(), dx.data_ptr(), dt.data_ptr(),
                           dtype_code(g), to_plan(plan), stream_of(g)),
           "max_backward");
}

void max_affine(const Tensor& x, const Tensor& t, const Tensor& a, const Tensor& b, Tensor& y,
                const std::vector<int64_t>& plan) {
  check(x, {&t, &y}, {&a, &b});
  const DeviceGuard guard(x.device());
  raise_if(fa_max_affine(x.data_ptr(), t.data_ptr(), a.data_ptr(), b.data_ptr(), y.data_ptr(),
                         dtype_code(x), to_plan(plan), stream_of(x)),
           "max_affine");
}

#ifndef FA_CPU
// fused_act.h fa_act_quant: q holds one-byte codes and scales its fp32 values or E8M0 bytes, both
// dense (the kernels write them row-major); up, where given, is gate's dtype.
void act_quant(const Tensor& gate, const OptTensor& up, Tensor& q, Tensor& scales,
               const std::vector<int64_t>& strides, int64_t act, double beta_value, int64_t fp8,
               int64_t scaling, int64_t block, const OptTensor& beta, const OptTensor& p1,
               const OptTensor& p2, int64_t run, const std::vector<int64_t>& plan) {
  check(gate, {}, {});
  if (up) check(gate, {&*up}, {});
  const fa_plan fp = to_plan(plan);
  for (const OptTensor* t : {&beta, &p1, &p2}) {
    if (!*t) continue;
    check(gate, {}, {&**t});
    TORCH_CHECK((*t)->numel() == fp.channels, "fused_act ", KIND, " kernels: a parameter of ",
                fp.channels, " values expected, got ", (*t)->numel());
  }
  for (const Tensor* t : {&q, &scales}) {
    check_memory(*t);
    TORCH_CHECK(t->device() == gate.device() && t->is_contiguous(), "fused_act ", KIND,
                " kernels: q and scales must be contiguous on ", gate.device());
  }
  TORCH_CHECK(q.element_size() == 1 && (scales.element_size() == 1 || scales.scalar_type() ==
                                        at::kFloat),
              "fused_act ", KIND, " kernels: q of one-byte codes and fp32 or one-byte scales "
              "expected, got ", q.scalar_type(), " and ", scales.scalar_type());
  const DeviceGuard guard(gate.device());
  raise_if(fa_act_quant(gate.data_ptr(), ptr(up), q.data_ptr(), scales.data_ptr(),
                        row_strides(strides, 2), dtype_code(gate), int(act), float(beta_value),
                        int(fp8), int(scaling), int(block), ptr(beta), ptr(p1), ptr(p2), run, fp,
                        stream_of(gate)),
           "act_quant");
}
#endif

#ifdef FA_CPU
// fused_act.h fa_quantize: y contiguous fp32, q one-byte codes of y's size, scales dense: fp32
// for tensor (one) and row (one a row) scaling, one-byte E8M0 for block scaling (one a `block`
// elements); scale, where given, the caller's fp32 value (tensor scaling).
void quantize(const Tensor& y, Tensor& q, Tensor& scales, const OptTensor& scale, int64_t fp8,
              int64_t scaling, int64_t block) {
  check(y, {}, {});
  if (scale) check(y, {}, {&*scale});
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.is_contiguous(), "fused_act ", KIND,
              " kernels: quantize takes contiguous fp32 y, got ", y.scalar_type());
  for (const Tensor* t : {&q, &scales}) {
    check_memory(*t);
    TORCH_CHECK(t->device() == y.device() && t->is_contiguous(), "fused_act ", KIND,
                " kernels: q and scales must be contiguous on ", y.device());
  }
  const int64_t cols = y.dim() == 0 ? 1 : y.size(-1);
  const int64_t rows = cols == 0 ? 0 : y.numel() / cols;
  // fa_quantize's selectors: 1 row, 2 block, else tensor
  TORCH_CHECK(scaling != 2 || (block > 0 && block <= INT32_MAX && cols % block == 0),
              "fused_act ", KIND, " kernels: quantize's block ", block, " must divide the row of ",
              cols);
  const bool fp32 = scaling != 2;
  const int64_t n_scales = scaling == 1 ? rows : scaling == 2 && block > 0 ? y.numel() / block : 1;
  TORCH_CHECK(q.element_size() == 1 && q.numel() == y.numel() && scales.numel() == n_scales &&
                  (fp32 ? scales.scalar_type() == at::kFloat : scales.element_size() == 1) &&
                  (!scale || scale->numel() == 1),
              "fused_act ", KIND, " kernels: quantize of y of shape ", y.sizes(), " expects q ",
              "of one-byte codes of its size, ", n_scales, fp32 ? " fp32" : " one-byte",
              " scales and a given scale of one value; got q ", q.scalar_type(), " ", q.sizes(),
              ", scales ", scales.scalar_type(), " ", scales.sizes());
  if (rows == 0) return;
  raise_if(fa_quantize(y.data_ptr<float>(), q.data_ptr(), scales.data_ptr(),
                       scale ? scale->data_ptr<float>() : nullptr, int(fp8), int(scaling),
                       int(block), rows, cols),
           "quantize");
}

// The eager paths on CPU tensors (fused_act/ops/eager.py): C++ autograd nodes, as torch's own
// ops have, in place of the op's Python Function, whose bookkeeping cost more than the kernels on
// small tensors.  The same kernels and plans as the op's "cpu" backend (plan.flat, row_plan,
// channel_plan), so the results are the op's bit for bit, a beta tensor's gradient reduced as the
// op reduces it, and the same saved tensors.  A backward that needs a graph of its own
// (create_graph) or gets a gradient the kernels cannot take (batched, a subclass) calls the
// Python side's differentiable backward of that node instead.
struct DifferentiableBackwards {
  pybind11::object activation, glu, max, acon, batch_norm, affine;
};
// kept to the end: no destructor runs at exit, after the interpreter
DifferentiableBackwards* differentiable = nullptr;

fa_plan flat_plan(int64_t n, int64_t block) {
  TORCH_CHECK(block > 0, "fused_act: a block of ", block, " elements");
  return fa_plan{1, n, 1, 0, 1, int32_t(block), 1, 0};
}

// to_plan's inverse: Plan.fields() of p
std::vector<int64_t> from_plan(const fa_plan& p) {
  return {p.rows, p.cols, p.channels, p.layout, p.block_r, p.block_l, p.samples, p.batch};
}

// A channel plan from the Python side (plan.channel_plan) as the kernels index x and the
// parameters by it: tiles of at least one element over x's elements; COLS reads a channel a
// column; a per-sample parameter's samples are x's N, its rows split evenly among them.
void check_channel_plan(const Tensor& x, const fa_plan& p, bool per_sample, const char* op) {
  const int64_t n = x.dim() > 0 ? x.size(0) : 1;
  TORCH_CHECK(!per_sample || n > 0, "fused_act: ", op, ": a per-sample plan of no samples");
  const bool tiles = p.block_r > 0 && p.block_l > 0 && p.samples > 0 && p.channels > 0 &&
                     p.rows * p.cols == x.numel();
  const bool samples = !per_sample              ? p.samples == 1 && p.batch == 0
                       : p.layout == FA_COLS ? p.samples == n && p.batch == 0 && p.rows % n == 0
                                             : p.samples == 1 && p.batch == n && p.rows % n == 0;
  TORCH_CHECK(tiles && samples && (p.layout != FA_COLS || p.cols == p.channels), "fused_act: ",
              op, " takes a channel plan of x's ", x.numel(), " elements (per sample: ",
              per_sample, ", of ", n, "), got the plan ", c10::IntArrayRef(from_plan(p)));
}

// plan.row_plan(rows, cols, layout): rows of cols contiguous elements, one row flat
fa_plan row_plan(int64_t rows, int64_t cols, int32_t layout, int64_t block) {
  TORCH_CHECK(block > 0, "fused_act: a block of ", block, " elements");
  if (rows == 1) return fa_plan{1, cols, 1, layout, 1, int32_t(block), 1, 0};
  int64_t width = 1;
  while (width < cols && width < block) width *= 2;
  return fa_plan{rows, cols, 1, layout, int32_t(block / width), int32_t(width), 1, 0};
}

// Whether an eager node's backward must run the Python side's differentiable backward: a graph
// of its own (create_graph), a torch.func transform over it, a TorchDispatchMode (make_fx,
// FakeTensorMode: a kernel would be invisible to it, or write through a fake tensor's pointer),
// or a gradient or saved tensor the kernels cannot take (batched, a subclass, another dtype
// than `dtype`, another device).
bool needs_differentiable(const Tensor& g, const Tensor& saved, at::ScalarType dtype) {
  constexpr auto wrapped = c10::DispatchKeySet({c10::DispatchKey::Batched,
                                                c10::DispatchKey::FuncTorchBatched,
                                                c10::DispatchKey::FuncTorchGradWrapper,
                                                c10::DispatchKey::Python});
  // a torch.func transform over the backward (as _are_functorch_transforms_active): what
  // empty_like makes there has no storage for a kernel
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  const bool transformed = included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
                           included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
  return at::GradMode::is_enabled() || transformed ||
         c10::impl::TorchDispatchModeTLS::stack_len() > 0 || g.key_set().has_any(wrapped) ||
         (saved.defined() && (saved.key_set().has_any(wrapped) || !saved.is_cpu())) ||
         g.scalar_type() != dtype || !g.is_cpu();
}

bool needs_differentiable(const Tensor& g, std::initializer_list<const Tensor*> saved) {
  for (const Tensor* t : saved) {
    if (needs_differentiable(g, *t, (*saved.begin())->scalar_type())) return true;
  }
  return false;
}

// A saved tensor as the kernels read it, in the strides it had at the forward (which the plan
// was made for): a saved-tensor hook's unpack may give any view
Tensor as_saved(const Tensor& x, c10::IntArrayRef strides) {
  return x.strides() == strides ? x : at::empty_strided(x.sizes(), strides, x.options()).copy_(x);
}

// A saved tensor as a saved-tensor hook's unpack gave it back must be what the forward saved
// before a kernel reads it by the forward's sizes and dtype (torch's own nodes trust it; ours
// would read past its memory)
void check_unpacked(const Tensor& t, c10::IntArrayRef sizes, at::ScalarType dtype,
                    const char* what) {
  TORCH_CHECK(t.sizes() == sizes && t.scalar_type() == dtype, "fused_act: the saved ", what,
              " came back from a saved-tensor hook as ", t.scalar_type(), " ", t.sizes(),
              ", not as the forward saved it (", dtype, " ", sizes, ")");
}

// g with x's strides (x dense): a copy only where they differ, e.g. the expanded gradient of a sum
Tensor like(const Tensor& g, const Tensor& x) {
  return g.strides() == x.strides() ? g : at::empty_like(x, g.options()).copy_(g);
}

void* ptr_of(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// A beta tensor as the kernels read it (layout.flat_param): flat, contiguous, in x's opmath
// dtype; none stays none
Tensor flat_param(const Tensor& p, const Tensor& x) {
  if (!p.defined()) return p;
  return p.reshape(-1).to(accumulator(x)).contiguous();
}

// partials for a beta's gradient (plan.Plan.partials, one quantity), where one is needed
Tensor partials_for(bool need, const Tensor& x, const fa_plan& p) {
  if (!need) return Tensor();
  return at::empty({fa_partial_slots(p)}, x.options().dtype(accumulator(x)));
}

// beta's gradient from its partials (plan.channel_sums), in beta's shape and dtype
Tensor beta_grad(const Tensor& partial, const Tensor& beta, int64_t channels) {
  if (!partial.defined()) return Tensor();
  return partial.view({-1, channels}).sum(0).reshape(beta.sizes()).to(beta.scalar_type());
}

// A defined tensor, or Python's None
pybind11::object or_none(const Tensor& t) {
  return t.defined() ? pybind11::cast(t) : pybind11::none();
}

// An activation's attributes: the name the Python side's backward takes, the kernel id and the
// fp32 beta.
struct ActAttrs {
  std::string name;
  int64_t act;
  double beta_value;
};

// A node's attributes beside its tensors: an activation's name and fp32 beta (the Python
// side's backward takes them) and the node's integers (a kernel id, a plan, x's strides, ...),
// of kinds that compiled autograd keys its cache on and packs for a call of the backward
struct Attrs {
  std::string name;
  double beta_value = 0;
  std::vector<int64_t> ints;
};

// The integers of parts, one after another
std::vector<int64_t> concat(std::initializer_list<c10::IntArrayRef> parts) {
  std::vector<int64_t> all;
  for (const auto part : parts) all.insert(all.end(), part.begin(), part.end());
  return all;
}

// A new node, in the pointer type of this torch's nodes (shared in older ones, intrusive since,
// which also fire node-creation hooks)
template <class T>
auto new_node() {
  if constexpr (std::is_same_v<decltype(torch::autograd::Edge::function),
                               std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<T>(new T(), [](T* n) { deleteNode(n); });
  } else {
    return c10::make_intrusive<T>();
  }
}

// What the eager nodes share. Each is a node of our own, as torch's generated ones are: a
// torch::autograd::Function's node costs more to record and to run (a 2^16 fp32 silu's
// forward+backward took 1.13x torch's with one, 1.06x with this). Its saved tensors are
// SavedVariables, so saved-tensor hooks, the in-place version check and a second backward's
// error are torch's own; its backward runs under the node's lock, given zeros where no
// gradient reached the output (as a Function's is). Compiled autograd calls the backward
// opaquely, as it calls a Function's (T::backward: the kernels, where its proxies are real
// tensors at run time).
template <class T>
struct EagerNode : public torch::autograd::Node {
  std::vector<torch::autograd::SavedVariable> saved;
  Attrs attrs;

  // y = run() with grad mode off (as a Function's forward: flattening a parameter records no
  // node), its grad_fn a new T of `attrs` that takes a gradient for each of `inputs` (an
  // undefined one: none) and saves `keep` once run() has written them (the max's code: a
  // saved-tensor hook that copies, as checkpointing's, packs what it is given then)
  template <class Run>
  static Tensor record(Attrs attrs, std::initializer_list<Tensor> inputs,
                       std::initializer_list<Tensor> keep, Run run) {
    auto node = new_node<T>();
    torch::autograd::edge_list edges;
    edges.reserve(inputs.size());
    for (const Tensor& t : inputs) {
      edges.push_back(t.defined() ? torch::autograd::impl::gradient_edge(t)
                                  : torch::autograd::Edge());
    }
    node->set_next_edges(std::move(edges));
    node->attrs = std::move(attrs);
    Tensor y;
    {
      at::AutoGradMode off(false);
      y = run();
    }
    node->saved.reserve(keep.size());
    for (const Tensor& t : keep) node->saved.emplace_back(t, false);
    torch::autograd::set_history(y, node);
    if constexpr (!std::is_same_v<decltype(node), std::shared_ptr<T>>) {
      fire_node_creation_hooks(node);
    }
    return y;
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    // a negative view's memory holds the negation of its values, which the kernels would read
    return T::backward(attrs, unpack_saved(),
                       grads[0].defined() ? grads[0].resolve_neg()
                                          : input_metadata(0).zeros_like(),
                       needs_input_grad());
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& s : saved) s.reset_data();
  }

  // the output's metadata too: the backward's zeros, where no gradient comes, take its shape
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(saved, false);
    args.collect(input_metadata(0));
    args.collect(attrs.name);
    args.collect(attrs.beta_value);
    args.collect(attrs.ints);
  }

  // T::backward from what apply_with_saved packed
  static torch::autograd::variable_list functional(const torch::autograd::variable_list& inputs,
                                                   const std::vector<c10::IValue>& args) {
    torch::dynamo::autograd::PackedArgs packed(args);
    auto unpacked = packed.unpack<std::vector<Tensor>>();
    const auto needs = packed.unpack<std::vector<bool>>();
    const auto y = packed.unpack<torch::autograd::InputMetadata>();
    Attrs a{packed.unpack<std::string>(), packed.unpack<double>(),
            packed.unpack<std::vector<int64_t>>()};
    return T::backward(a, std::move(unpacked),
                       inputs[0].defined() ? inputs[0].resolve_neg() : y.zeros_like(), needs);
  }

  // as a Function's node (CppNode::apply_with_saved): one opaque call of `functional` in the
  // captured graph, of the saved tensors and attributes packed
  torch::autograd::variable_list apply_with_saved(
      const torch::autograd::variable_list& inputs,
      torch::dynamo::autograd::SwapSavedVariables& swap) override {
    for (auto& s : saved) swap.before(s);
    swap.before(mutable_input_metadata(0));  // as compiled_args collected it
    torch::dynamo::autograd::PackedArgs packed;
    packed.pack(unpack_saved());
    packed.pack(needs_input_grad());
    packed.pack(input_metadata(0));
    packed.pack(attrs.name);
    packed.pack(attrs.beta_value);
    packed.pack(attrs.ints);
    const auto& args = packed.vec();
    std::vector<at::TypePtr> schema;
    for (const auto& v : args) {
      schema.push_back(v.isTensor() ? at::TensorType::get() : v.type());
    }
    const auto& py = torch::dynamo::autograd::getPyCompilerInterface();
    const auto fn = py->bind_function(swap.get_py_compiler(), name(), functional, schema,
                                      /*is_custom_function=*/true, /*is_traceable=*/false);
    auto out = py->call_function(
        swap.get_py_compiler(), "apply_functional", fn, inputs, args,
        torch::dynamo::autograd::IValuePacker<
            std::vector<std::optional<torch::autograd::InputMetadata>>>::
            pack(torch::dynamo::autograd::get_input_metadata(next_edges())));
    for (auto& s : saved) swap.after(s);
    swap.after(mutable_input_metadata(0));
    return out;
  }

 private:
  std::vector<Tensor> unpack_saved() const {
    std::vector<Tensor> unpacked;
    unpacked.reserve(saved.size());
    // resolved: a saved-tensor hook may unpack a negative view
    for (const auto& s : saved) unpacked.push_back(s.unpack().resolve_neg());
    return unpacked;
  }

  // which inputs this backward owes a gradient
  std::vector<bool> needs_input_grad() const {
    std::vector<bool> needs(num_outputs());
    for (size_t i = 0; i < needs.size(); ++i) needs[i] = task_should_compute_output(i);
    return needs;
  }
};

// An activation (run_activation) on a dense x, with a float beta or a beta tensor read by
// `plan` (activation._act_plan; none: flat); saves x and beta.
// Its integers: the kernel id, the plan, x's strides (which the plan was made for).
struct EagerActivation : public EagerNode<EagerActivation> {
  static Tensor run(const Tensor& x, const Tensor& beta, const ActAttrs& a, const fa_plan& p) {
    Tensor y = at::empty_like(x), fb = flat_param(beta, x);
    raise_if(fa_act_forward(x.data_ptr(), y.data_ptr(), dtype_code(x), int(a.act), ptr_of(fb),
                            float(a.beta_value), p, nullptr),
             "act_forward");
    return y;
  }

  std::string name() const override { return "EagerActivationBackward"; }

  static torch::autograd::variable_list backward(const Attrs& at, std::vector<Tensor> saved,
                                                 Tensor g, const std::vector<bool>& needs) {
    Tensor x = saved[0], beta = saved[1];
    const ActAttrs a{at.name, at.ints[0], at.beta_value};
    const fa_plan p = to_plan(c10::IntArrayRef(at.ints).slice(1, FA_PLAN_FIELDS));
    const bool need_dbeta = beta.defined() && needs[1];
    if (needs_differentiable(g, {&x, &beta})) {
      pybind11::gil_scoped_acquire gil;
      auto d = differentiable->activation(g, x, a.name, or_none(beta), a.beta_value, need_dbeta)
                   .cast<std::tuple<Tensor, OptTensor>>();
      return {std::get<0>(d), std::get<1>(d).value_or(Tensor())};
    }
    check_unpacked(x, g.sizes(), g.scalar_type(), "x");
    TORCH_CHECK(!beta.defined() || beta.numel() == p.channels, "fused_act: the saved beta came "
                "back from a saved-tensor hook with ", beta.numel(), " values, not the plan's ",
                p.channels);
    x = as_saved(x, c10::IntArrayRef(at.ints).slice(1 + FA_PLAN_FIELDS));
    g = like(g, x);
    Tensor dx = at::empty_like(x), fb = flat_param(beta, x);
    Tensor partial = partials_for(need_dbeta, x, p);
    raise_if(fa_act_backward(g.data_ptr(), x.data_ptr(), dx.data_ptr(), dtype_code(x),
                             int(a.act), ptr_of(fb), float(a.beta_value), ptr_of(partial), p,
                             nullptr),
             "act_backward");
    return {dx, beta_grad(partial, beta, p.channels)};
  }
};

// Whether a call records a node: grad mode on and an input that requires grad (else the nodes'
// bookkeeping is skipped, as autograd would skip the graph)
bool records(std::initializer_list<const Tensor*> inputs) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : inputs) {
    if (t->defined() && t->requires_grad()) return true;
  }
  return false;
}

Tensor eager_activation(const Tensor& x, const OptTensor& beta, const std::string& name,
                        int64_t act, double beta_value, int64_t block,
                        const std::optional<std::vector<int64_t>>& plan) {
  check(x, {}, {});
  const fa_plan p = plan ? to_plan(*plan) : flat_plan(x.numel(), block);
  // one flat pass over x's memory (any dense layout, its output of the same strides), in tiles
  // of the plan, which reads beta's values by channel
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "fused_act: eager_activation takes a dense x, "
              "got sizes ", x.sizes(), " and strides ", x.strides());
  check_channel_plan(x, p, false, "eager_activation");
  const Tensor b = beta.value_or(Tensor());
  if (b.defined()) {
    check_memory(b);
    TORCH_CHECK(b.device() == x.device() && b.is_floating_point() && b.numel() == p.channels,
                "fused_act: eager_activation takes a floating beta of the plan's ", p.channels,
                " channels on ", x.device(), ", got ", b.scalar_type(), " ", b.sizes(), " on ",
                b.device());
  }
  const ActAttrs a{name, act, beta_value};
  if (!records({&x, &b})) return EagerActivation::run(x, b, a, p);
  return EagerActivation::record({name, beta_value, concat({{act}, from_plan(p), x.strides()})},
                                 {x, b}, {x, b}, [&] { return EagerActivation::run(x, b, a, p); });
}

// How act(gate) * up walks its tensors: separate contiguous gate and up are one flat row; the
// halves of a contiguous packed gate along `dim` (up undefined) are the rows of `cols`
// elements before dim's middle and after it, 2 cols apart.
struct GluWalk {
  int64_t rows, cols;
  bool packed;

  GluWalk(const Tensor& gate, const Tensor& up, int64_t dim) : packed(!up.defined()) {
    rows = 1;
    cols = gate.numel();
    if (packed) {
      rows = c10::multiply_integers(gate.sizes().slice(0, dim));
      cols = rows == 0 ? 0 : gate.numel() / rows / 2;
    }
  }
  // gate's (and up's) distance between rows; out's is cols
  int64_t stride() const { return packed ? 2 * cols : cols; }
  const void* up(const Tensor& gate, const Tensor& up) const {
    return packed ? static_cast<const char*>(gate.data_ptr()) + cols * gate.element_size()
                  : up.data_ptr();
  }
  // glu._glu_plan: a beta tensor (one value) is read as one channel of ROWS
  fa_plan plan(const Tensor& beta, int64_t block) const {
    return row_plan(rows, cols, beta.defined() ? FA_ROWS : FA_SCALAR, block);
  }
};

// act(gate) * up (run_glu) on contiguous CPU tensors, with a float beta or a beta tensor of one
// value: gate and up of one shape and dtype, or the halves of a packed gate along dim (up
// undefined, as the op's None); saves gate, up and beta.
// Its integers: the kernel id, dim and the block.
struct EagerGlu : public EagerNode<EagerGlu> {
  static Tensor run(const Tensor& gate, const Tensor& up, const Tensor& beta, const ActAttrs& a,
                    int64_t dim, int64_t block) {
    const GluWalk w(gate, up, dim);
    auto shape = gate.sizes().vec();
    if (w.packed) shape[dim] /= 2;
    Tensor out = at::empty(shape, gate.options()), fb = flat_param(beta, gate);
    const int64_t s[3] = {w.stride(), w.stride(), w.cols};
    raise_if(fa_glu_forward(gate.data_ptr(), w.up(gate, up), out.data_ptr(), s,
                            dtype_code(gate), int(a.act), ptr_of(fb), float(a.beta_value),
                            w.plan(beta, block), nullptr),
             "glu_forward");
    return out;
  }

  std::string name() const override { return "EagerGluBackward"; }

  static torch::autograd::variable_list backward(const Attrs& at, std::vector<Tensor> saved,
                                                 Tensor g, const std::vector<bool>& needs) {
    Tensor gate = saved[0], up = saved[1], beta = saved[2];
    const ActAttrs a{at.name, at.ints[0], at.beta_value};
    const int64_t dim = at.ints[1], block = at.ints[2];
    const bool need_dbeta = beta.defined() && needs[2];
    if (needs_differentiable(g, {&gate, &up, &beta})) {
      pybind11::gil_scoped_acquire gil;
      auto d = differentiable->glu(g, gate, or_none(up), a.name, or_none(beta), a.beta_value,
                                   dim, need_dbeta)
                   .cast<std::tuple<Tensor, OptTensor, OptTensor>>();
      return {std::get<0>(d), std::get<1>(d).value_or(Tensor()),
              std::get<2>(d).value_or(Tensor())};
    }
    auto gate_sizes = g.sizes().vec();  // packed: twice g's size along dim
    if (!up.defined()) gate_sizes[dim] *= 2;
    check_unpacked(gate, gate_sizes, g.scalar_type(), "gate");
    if (up.defined()) check_unpacked(up, g.sizes(), g.scalar_type(), "up");
    TORCH_CHECK(!beta.defined() || beta.numel() == 1, "fused_act: the saved beta came back from "
                "a saved-tensor hook with ", beta.numel(), " values, not one");
    gate = gate.contiguous();  // a saved-tensor hook's unpack may give any view
    if (up.defined()) up = up.contiguous();
    g = g.contiguous();
    const GluWalk w(gate, up, dim);
    const fa_plan p = w.plan(beta, block);
    // packed: d of gate's two halves, written in place into one tensor of gate's shape
    Tensor dgate = at::empty_like(gate), dup = w.packed ? Tensor() : at::empty_like(gate);
    void* dup_ptr = w.packed ? static_cast<char*>(dgate.data_ptr()) + w.cols * gate.element_size()
                             : dup.data_ptr();
    Tensor fb = flat_param(beta, gate), partial = partials_for(need_dbeta, gate, p);
    const int64_t s = w.stride(), strides[5] = {w.cols, s, s, s, s};
    raise_if(fa_glu_backward(g.data_ptr(), gate.data_ptr(), w.up(gate, up), dgate.data_ptr(),
                             dup_ptr, strides, dtype_code(gate), int(a.act), ptr_of(fb),
                             float(a.beta_value), ptr_of(partial), p, nullptr),
             "glu_backward");
    return {dgate, dup, beta_grad(partial, beta, 1)};
  }
};

Tensor eager_glu(const Tensor& gate, const OptTensor& up, const OptTensor& beta,
                 const std::string& name, int64_t act, double beta_value, int64_t dim,
                 int64_t block) {
  check(gate, {}, {});
  if (up) {
    check(gate, {&*up}, {});
    // one flat pass over both: contiguous, of one shape
    TORCH_CHECK(gate.is_contiguous() && up->is_contiguous() && gate.sizes() == up->sizes(),
                "fused_act: eager_glu takes contiguous gate and up of one shape, got ",
                gate.sizes(), " and ", up->sizes());
  } else {
    TORCH_CHECK(gate.is_contiguous() && gate.dim() > 0, "fused_act: eager_glu takes a "
                "contiguous gate of one dimension or more, got sizes ", gate.sizes());
    dim = c10::maybe_wrap_dim(dim, gate.dim());
    TORCH_CHECK(gate.size(dim) % 2 == 0, "fused_act: eager_glu splits gate of sizes ",
                gate.sizes(), " into two halves along dim ", dim, ": an even size expected");
  }
  if (beta) {
    check_memory(*beta);
    TORCH_CHECK(beta->device() == gate.device() && beta->is_floating_point() &&
                    beta->numel() == 1,
                "fused_act: eager_glu takes a floating beta of one value on ", gate.device(),
                ", got ", beta->scalar_type(), " ", beta->sizes(), " on ", beta->device());
  }
  const ActAttrs a{name, act, beta_value};
  const Tensor u = up.value_or(Tensor()), b = beta.value_or(Tensor());
  if (!records({&gate, &u, &b})) return EagerGlu::run(gate, u, b, a, dim, block);
  return EagerGlu::record({name, beta_value, {act, dim, block}}, {gate, u, b}, {gate, u, b},
                         [&] { return EagerGlu::run(gate, u, b, a, dim, block); });
}

// max(x, t) (run_max) on a dense x and a t of its strides; saves the one-byte code of the side
// that won, written only where a backward will read it (need_code: else no node).
// Its integers: the block, x's strides (the code's).
struct EagerMax : public EagerNode<EagerMax> {
  // max(x, t), and its code where code is defined
  static Tensor run(const Tensor& x, const Tensor& t, const Tensor& code, int64_t block) {
    Tensor y = at::empty_like(x);
    raise_if(fa_max_forward(x.data_ptr(), t.data_ptr(), y.data_ptr(), ptr_of(code),
                            dtype_code(x), flat_plan(x.numel(), block), nullptr),
             "max_forward");
    return y;
  }

  std::string name() const override { return "EagerMaxBackward"; }

  static torch::autograd::variable_list backward(const Attrs& at, std::vector<Tensor> saved,
                                                 Tensor g, const std::vector<bool>&) {
    Tensor code = saved[0];
    if (needs_differentiable(g, code, g.scalar_type())) {
      pybind11::gil_scoped_acquire gil;
      auto d = differentiable->max(g, code).cast<std::tuple<Tensor, Tensor>>();
      return {std::get<0>(d), std::get<1>(d)};
    }
    check_unpacked(code, g.sizes(), at::kByte, "code");
    code = as_saved(code, c10::IntArrayRef(at.ints).slice(1));
    g = like(g, code);
    Tensor dx = at::empty_like(g), dt = at::empty_like(g);
    raise_if(fa_max_backward(g.data_ptr(), code.data_ptr(), dx.data_ptr(), dt.data_ptr(),
                             dtype_code(g), flat_plan(code.numel(), at.ints[0]), nullptr),
             "max_backward");
    return {dx, dt};
  }
};

Tensor eager_max(const Tensor& x, const Tensor& t, bool need_code, int64_t block) {
  check(x, {&t}, {});
  // one flat pass over the memory of both
  TORCH_CHECK(x.is_non_overlapping_and_dense() && t.sizes() == x.sizes() &&
                  t.strides() == x.strides(),
              "fused_act: eager_max takes a dense x and a t of its sizes and strides, got ",
              x.sizes(), " ", x.strides(), " and ", t.sizes(), " ", t.strides());
  // need_code: grad mode on and x or t requiring grad (as records() would say)
  if (!need_code) return EagerMax::run(x, t, Tensor(), block);
  const Tensor code = at::empty_like(x, x.options().dtype(at::kByte));
  return EagerMax::record({"", 0, concat({{block}, x.strides()})}, {x, t}, {code},
                          [&] { return EagerMax::run(x, t, code, block); });
}

// No one but the kernels may see an eager call: no TorchFunctionMode on the stack (the public
// wrapper's has_torch_function asks it in Python), no TorchDispatchMode, no torch.func transform,
// no jit trace (fused_act/ops/eager.py's _kernels and reference_math); compiling, forward AD and
// the backend stay the Python caller's questions (ops.call_entry)
bool untouched() {
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  return at::impl::PythonTorchFunctionTLS::stack_len() == 0 &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
         !included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode) &&
         !torch::jit::tracer::isTracing();
}

// The public frelu_max's whole eager call, its arguments as given (args), on plain CPU tensors
// (torch.Tensor or Parameter, not a subclass) of a supported dtype, the same dtype, sizes and
// dense strides, none empty or a negative view: eager_max as run_max would call it.  None for
// every other call, which the Python path checks (raising its errors) and routes; that path
// cost a 2^16-element forward 1.24-1.71x torch.maximum's time.
pybind11::object fast_max(const pybind11::tuple& args, int64_t block) {
  if (args.size() != 2 || !THPVariable_CheckExact(args[0].ptr()) ||
      !THPVariable_CheckExact(args[1].ptr()) || !untouched()) {
    return pybind11::none();
  }
  // copies, not references: another thread may swap the objects' tensors (swap_tensors) while
  // the kernel runs without the GIL
  const Tensor x = THPVariable_Unpack(args[0].ptr());
  const Tensor t = THPVariable_Unpack(args[1].ptr());
  const auto s = x.scalar_type();
  if ((s != at::kFloat && s != at::kHalf && s != at::kBFloat16 && s != at::kDouble) ||
      t.scalar_type() != s || !x.is_cpu() || !t.is_cpu() || x.is_neg() || t.is_neg() ||
      x.numel() == 0 || !x.is_non_overlapping_and_dense() || t.sizes() != x.sizes() ||
      t.strides() != x.strides()) {
    return pybind11::none();
  }
  const bool need_code = at::GradMode::is_enabled() && (x.requires_grad() || t.requires_grad());
  Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = eager_max(x, t, need_code, block);
  }
  return pybind11::cast(std::move(y));
}

// ACON-C (run_acon) on a dense x, N outermost in memory for a per-sample beta (Meta-ACON), with
// the op's channel plan; saves x, p1, p2 and beta.
// Its integers: per_sample, the plan, x's strides (which the plan was made for).
struct EagerAcon : public EagerNode<EagerAcon> {
  static Tensor run(const Tensor& x, const Tensor& p1, const Tensor& p2, const Tensor& beta,
                    bool per_sample, const fa_plan& p) {
    Tensor y = at::empty_like(x);
    raise_if(fa_acon_forward(x.data_ptr(), y.data_ptr(), dtype_code(x),
                             flat_param(p1, x).data_ptr(), flat_param(p2, x).data_ptr(),
                             flat_param(beta, x).data_ptr(), per_sample, p, nullptr),
             "acon_forward");
    return y;
  }

  std::string name() const override { return "EagerAconBackward"; }

  static torch::autograd::variable_list backward(const Attrs& at, std::vector<Tensor> saved,
                                                 Tensor g, const std::vector<bool>& needs) {
    Tensor x = saved[0];
    const Tensor &p1 = saved[1], &p2 = saved[2], &beta = saved[3];
    const bool per_sample = at.ints[0];
    const fa_plan p = to_plan(c10::IntArrayRef(at.ints).slice(1, FA_PLAN_FIELDS));
    const bool need_params = needs[1] || needs[2] || needs[3];
    if (needs_differentiable(g, {&x, &p1, &p2, &beta})) {
      pybind11::gil_scoped_acquire gil;
      auto d = differentiable->acon(g, x, p1, p2, beta)
                   .cast<std::tuple<Tensor, Tensor, Tensor, Tensor>>();
      return {std::get<0>(d), std::get<1>(d), std::get<2>(d), std::get<3>(d)};
    }
    check_unpacked(x, g.sizes(), g.scalar_type(), "x");
    const int64_t n = x.size(0), betas = per_sample ? n * p.channels : p.channels;
    TORCH_CHECK(p1.numel() == p.channels && p2.numel() == p.channels && beta.numel() == betas,
                "fused_act: the saved p1, p2 and beta came back from a saved-tensor hook with ",
                p1.numel(), ", ", p2.numel(), " and ", beta.numel(), " values, not ", p.channels,
                ", ", p.channels, " and ", betas);
    x = as_saved(x, c10::IntArrayRef(at.ints).slice(1 + FA_PLAN_FIELDS));
    g = like(g, x);
    const int64_t slots = fa_partial_slots(p);
    Tensor dx = at::empty_like(x), partial;
    if (need_params) partial = at::empty({3 * slots}, x.options().dtype(accumulator(x)));
    raise_if(fa_acon_backward(g.data_ptr(), x.data_ptr(), dx.data_ptr(), dtype_code(x),
                              flat_param(p1, x).data_ptr(), flat_param(p2, x).data_ptr(),
                              flat_param(beta, x).data_ptr(), per_sample, ptr_of(partial), slots,
                              p, nullptr),
             "acon_backward");
    if (!need_params) return {dx, Tensor(), Tensor(), Tensor()};
    // plan.acon_sums, call for call: the op's gradients bit for bit
    const bool same = p1.scalar_type() == p2.scalar_type() && p1.scalar_type() == beta.scalar_type();
    const auto out = same ? p1.scalar_type() : accumulator(x);
    const int64_t c = p.channels;
    Tensor dp1, dp2, dbeta;
    if (!per_sample) {
      const Tensor sums = partial.view({3, -1, c}).sum(1).to(out);
      dp1 = sums[0], dp2 = sums[1], dbeta = sums[2];
    } else {
      const int64_t col_blocks = (p.cols + p.block_l - 1) / p.block_l;
      const Tensor by_sample = p.layout == FA_ROWS
                                   ? partial.view({3, col_blocks, n, -1, c}).sum({1, 3})
                                   : partial.view({3, n, -1, c}).sum(2);
      const Tensor dp = by_sample.slice(0, 0, 2).sum(1).to(out);
      dp1 = dp[0], dp2 = dp[1], dbeta = by_sample[2].to(out);
    }
    const auto as = [](const Tensor& d, const Tensor& q) {
      return d.reshape(q.sizes()).to(q.scalar_type());
    };
    return {dx, as(dp1, p1), as(dp2, p2), as(dbeta, beta)};
  }
};

Tensor eager_acon(const Tensor& x, const Tensor& p1, const Tensor& p2, const Tensor& beta,
                  bool per_sample, const std::vector<int64_t>& plan) {
  check(x, {}, {});
  const fa_plan p = to_plan(plan);
  // one pass over x's memory in the plan's tiles, which read the parameters by channel (and by
  // sample: N outermost)
  TORCH_CHECK(x.dim() >= 2 && x.is_non_overlapping_and_dense() &&
                  (!per_sample || x.size(0) == 1 || x.stride(0) * x.size(0) == x.numel()),
              "fused_act: eager_acon takes a dense x (N outermost for a per-sample beta), got "
              "sizes ", x.sizes(), " and strides ", x.strides());
  check_channel_plan(x, p, per_sample, "eager_acon");
  const int64_t betas = per_sample ? x.size(0) * p.channels : p.channels;
  for (const auto& [name, t, count] : {std::tuple{"p1", &p1, p.channels},
                                       std::tuple{"p2", &p2, p.channels},
                                       std::tuple{"beta", &beta, betas}}) {
    check_memory(*t);
    TORCH_CHECK(t->device() == x.device() && t->is_floating_point() && t->numel() == count,
                "fused_act: eager_acon takes a floating ", name, " of ", count, " values on ",
                x.device(), " (the plan's ", p.channels, " channels", per_sample && t == &beta ?
                " per sample" : "", "), got ", t->scalar_type(), " ", t->sizes(), " on ",
                t->device());
  }
  if (!records({&x, &p1, &p2, &beta})) return EagerAcon::run(x, p1, p2, beta, per_sample, p);
  return EagerAcon::record({"", 0, concat({{per_sample}, from_plan(p), x.strides()})},
                          {x, p1, p2, beta}, {x, p1, p2, beta},
                          [&] { return EagerAcon::run(x, p1, p2, beta, per_sample, p); });
}

// The (mean, biased variance) of each channel from the stats kernel's per-slot counts, sums and
// sums of squared distances from the slot's mean (3 x slots, slot j of channel j % channels):
// the slots' M2 plus each slot's count times its mean's squared distance from the channel's
// (batchnorm.merge_stats, whose torch ops cost more than the kernel on small tensors), a sum of
// non-negative terms, in slot order (deterministic) and in double (a channel may have millions
// of slots: an fp32 running sum drifts, and its count stops being exact past 2^24).  Walked a
// row of C slots at a time, every channel's sums side by side (each still in its slots' order):
// a channel at a time strode through the slots, and cost a third of the stats kernel's time.
std::tuple<Tensor, Tensor> merge_stats(const Tensor& partial, int64_t channels) {
  TORCH_CHECK(partial.device().type() == DEVICE && partial.dim() == 2 && partial.size(0) == 3 &&
                  partial.is_contiguous() && channels > 0 && partial.size(1) % channels == 0 &&
                  (partial.scalar_type() == at::kFloat || partial.scalar_type() == at::kDouble),
              "fused_act ", KIND, " kernels: merge_stats takes contiguous fp32 or fp64 partials "
              "of 3 rows of a multiple of ", channels, " slots, got ", partial.scalar_type(), " ",
              partial.sizes());
  Tensor mean = at::empty({channels}, partial.options()), var = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "merge_stats", [&] {
    const int64_t slots = partial.size(1);
    const scalar_t *n = partial.const_data_ptr<scalar_t>(), *s = n + slots, *m2 = s + slots;
    std::vector<double> total(channels), sum(channels), mu(channels), spread(channels),
        squares(channels);
    for (int64_t row = 0; row < slots; row += channels) {
      for (int64_t c = 0; c < channels; ++c) total[c] += n[row + c], sum[c] += s[row + c];
    }
    for (int64_t c = 0; c < channels; ++c) mu[c] = sum[c] / total[c];
    for (int64_t row = 0; row < slots; row += channels) {
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t j = row + c;
        squares[c] += m2[j];
        // an empty slot adds nothing (its mean is 0 / 0)
        const double d = n[j] > 0 ? double(s[j]) / n[j] - mu[c] : 0.0;
        spread[c] += n[j] * (d * d);
      }
    }
    for (int64_t c = 0; c < channels; ++c) {
      mean.data_ptr<scalar_t>()[c] = scalar_t(mu[c]);
      var.data_ptr<scalar_t>()[c] = scalar_t((squares[c] + spread[c]) / total[c]);
    }
  });
  return {mean, var};
}

// BatchNorm's training backward in one evaluation of f' (fused_act.h fa_batch_norm_backward):
// dx, and the per-channel sums of dz and dz (x - c) into sums (2, C)
void batch_norm_backward(const Tensor& g, const Tensor& x, Tensor& dx, int64_t act,
                         const Tensor& c, const Tensor& a, const Tensor& b, const Tensor& invstd,
                         double beta_value, Tensor& sums, const std::vector<int64_t>& plan) {
  check(x, {&g, &dx}, {&c, &a, &b, &invstd, &sums});
  const fa_plan p = to_plan(plan);
  check_channel_plan(x, p, false, "batch_norm_backward");
  TORCH_CHECK(x.is_non_overlapping_and_dense() && g.strides() == x.strides() &&
                  dx.strides() == x.strides() && g.sizes() == x.sizes() &&
                  dx.sizes() == x.sizes(),
              "fused_act: batch_norm_backward takes dense x, g and dx of one layout");
  for (const Tensor* t : {&c, &a, &b, &invstd}) {
    TORCH_CHECK(t->numel() == p.channels, "fused_act: batch_norm_backward takes ", p.channels,
                " values a channel parameter, got ", t->numel());
  }
  TORCH_CHECK(sums.numel() == 2 * p.channels, "fused_act: batch_norm_backward writes 2 x ",
              p.channels, " sums, got a buffer of ", sums.numel());
  raise_if(fa_batch_norm_backward(g.data_ptr(), x.data_ptr(), dx.data_ptr(), dtype_code(x),
                                  int(act), c.data_ptr(), a.data_ptr(), b.data_ptr(),
                                  invstd.data_ptr(), float(beta_value), sums.data_ptr(), p),
           "batch_norm_backward");
}

// act((x - c) a + b) of a dense x, C values of x's opmath each at c, a and b, as the op's
// affine_act forward (the eager BatchNorm nodes' forward)
Tensor affine_forward(const Tensor& x, const void* c, const void* a, const void* b,
                      const ActAttrs& at, const fa_plan& p) {
  Tensor y = at::empty_like(x);
  raise_if(fa_affine_act_forward(x.data_ptr(), y.data_ptr(), dtype_code(x), int(at.act), c, a, b,
                                 nullptr, float(at.beta_value), nullptr, nullptr, p, nullptr),
           "affine_act_forward");
  return y;
}

// The C values of t (shape (C,) or C values in any shape, any floating dtype and stride) as
// `to` converts them to op_t (exactly, or rounded to nearest for double to float), into out.
template <typename op_t>
void read_as(const Tensor& t, op_t* out) {
  const Tensor v = t.dim() == 1 ? t : t.reshape(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "read_as", [&] {
    const scalar_t* in = v.const_data_ptr<scalar_t>();
    const int64_t n = v.numel(), stride = v.stride(0);
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<op_t>(in[i * stride]);
  });
}

// A tensor like `like` (its shape and dtype, contiguous) of values[i] (times scale[i] where
// given) rounded once to its dtype, as `.to` rounds (to nearest even).
template <typename op_t>
Tensor write_as(const Tensor& like, const op_t* values, const op_t* scale) {
  Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "write_as", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t i = 0, n = out.numel(); i < n; ++i) {
      o[i] = static_cast<scalar_t>(scale ? values[i] * scale[i] : values[i]);
    }
  });
  return out;
}

// BatchNorm in training then an elementwise activation with a float beta (batch_norm_act) on a
// dense x (N, C, *) with the op's channel plan, as the op computes it call for call, on the
// batch statistics (the stats kernel's partials merged by merge_stats), the running
// statistics, where given, updated as torch's BatchNorm updates them (no version bump:
// checkpointing saves them as inputs). Weight and bias (C values, or undefined) take
// gradients. Saves what the op saves, in its order: x, weight, bias, the batch mean and biased
// variance in opmath (checkpointing may recompute the forward under another backend, whose
// saved tensors this backward then reads).  eager_batch_norm also runs eval without a node
// (run on the running statistics) where no gradient is to be taken, and as EagerAffine where
// one is.
// Its integers: the kernel id, eps's bits, the plan, x's strides.
struct EagerBatchNorm : public EagerNode<EagerBatchNorm> {
  // the running or batch mean, 1 / sqrt(var + eps) and the affine in front of the activation
  // (reference.bn_affine's a = weight / sqrt(var + eps) and b = bias, 1 and 0 where left out),
  // C values each in the rows of one (4, C) tensor of x's opmath: a loop, where torch's ops
  // on C values (a dozen a call, each forward and backward) cost more than a 2^16-element
  // layer's kernel gains on torch's.  Each value is the IEEE operation those ops compute,
  // rounded once as there (var + eps in opmath, 1 / sqrt, a product): bit for bit the op's.
  static Tensor coefficients(const Tensor& mean, const Tensor& var, double eps,
                             const Tensor& weight, const Tensor& bias, at::ScalarType op) {
    const int64_t n = var.numel();
    Tensor out = at::empty({4, n}, var.options().dtype(op));
    AT_DISPATCH_FLOATING_TYPES(op, "coefficients", [&] {
      scalar_t *c = out.data_ptr<scalar_t>(), *invstd = c + n, *a = invstd + n, *b = a + n;
      read_as(mean, c);
      read_as(var, invstd);
      for (int64_t i = 0; i < n; ++i) {
        invstd[i] = scalar_t(1) / std::sqrt(invstd[i] + scalar_t(eps));
      }
      if (weight.defined()) {
        read_as(weight, a);
        for (int64_t i = 0; i < n; ++i) a[i] *= invstd[i];
      } else {
        std::copy(invstd, invstd + n, a);
      }
      if (bias.defined()) {
        read_as(bias, b);
      } else {
        std::fill(b, b + n, scalar_t(0));
      }
    });
    return out;
  }

  static Tensor run(const Tensor& x, const Tensor& weight, const Tensor& bias, const Tensor& mean,
                    const Tensor& var, double eps, const ActAttrs& a, const fa_plan& p) {
    const Tensor k = coefficients(mean, var, eps, weight, bias, accumulator(x));
    const int64_t bytes = k.size(1) * k.element_size();
    const char* c = static_cast<const char*>(k.const_data_ptr());
    return affine_forward(x, c, c + 2 * bytes, c + 3 * bytes, a, p);
  }

  std::string name() const override { return "EagerBatchNormBackward"; }

  // batchnorm.batch_norm_act_backward_impl on CPU, call for call
  static torch::autograd::variable_list backward(const Attrs& at, std::vector<Tensor> saved,
                                                 Tensor g, const std::vector<bool>& needs) {
    Tensor x = saved[0];
    const Tensor &weight = saved[1], &bias = saved[2], &mean = saved[3], &var = saved[4];
    const ActAttrs a{at.name, at.ints[0], at.beta_value};
    const double eps = c10::bit_cast<double>(at.ints[1]);
    const fa_plan p = to_plan(c10::IntArrayRef(at.ints).slice(2, FA_PLAN_FIELDS));
    const bool need_params = (weight.defined() && needs[1]) || (bias.defined() && needs[2]);
    if (needs_differentiable(g, {&x, &weight, &bias})) {
      pybind11::gil_scoped_acquire gil;
      auto d = differentiable->batch_norm(g, x, or_none(weight), or_none(bias), eps, a.name,
                                          a.beta_value, need_params)
                   .cast<std::tuple<Tensor, OptTensor, OptTensor>>();
      return {std::get<0>(d), std::get<1>(d).value_or(Tensor()),
              std::get<2>(d).value_or(Tensor())};
    }
    check_unpacked(x, g.sizes(), g.scalar_type(), "x");
    for (const auto& [what, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias}}) {
      TORCH_CHECK(!t->defined() || t->numel() == p.channels, "fused_act: the saved ", what,
                  " came back from a saved-tensor hook with ", t->numel(), " values, not the "
                  "plan's ", p.channels);
    }
    check_unpacked(mean, {p.channels}, accumulator(x), "mean");
    check_unpacked(var, {p.channels}, accumulator(x), "variance");
    x = as_saved(x, c10::IntArrayRef(at.ints).slice(2 + FA_PLAN_FIELDS));
    g = like(g, x);
    const Tensor k = coefficients(mean, var, eps, weight, bias, accumulator(x));
    const int64_t bytes = k.size(1) * k.element_size();
    char* c = static_cast<char*>(k.data_ptr());
    Tensor dx = at::empty_like(x);
    Tensor sums = at::empty({2, p.channels}, x.options().dtype(accumulator(x)));
    raise_if(fa_batch_norm_backward(g.data_ptr(), x.data_ptr(), dx.data_ptr(), dtype_code(x),
                                    int(a.act), c, c + 2 * bytes, c + 3 * bytes, c + bytes,
                                    float(a.beta_value), sums.data_ptr(), p),
             "batch_norm_backward");
    if (!need_params) return {dx, Tensor(), Tensor()};
    // (sums[1] * invstd).to(weight's dtype) and sums[0].to(bias's), as the op's backward
    Tensor dw, db;
    AT_DISPATCH_FLOATING_TYPES(sums.scalar_type(), "batch_norm_backward", [&] {
      const scalar_t *s = sums.const_data_ptr<scalar_t>(),
                     *invstd = reinterpret_cast<const scalar_t*>(c + bytes);
      if (weight.defined()) dw = write_as(weight, s + p.channels, invstd);
      if (bias.defined()) db = write_as(bias, s, static_cast<const scalar_t*>(nullptr));
    });
    return {dx, dw, db};
  }
};

// BatchNorm in eval then an elementwise activation with a float beta (batch_norm_act) where a
// gradient is to be taken: the op's affine_act on the running statistics folded into c, a, b
// (its forward computes them with autograd on, as the op's caller does: a reaches weight
// through torch's Mul node, b bias), as the op computes it call for call, and saves what the
// op saves: x, c, a, b (checkpointing may recompute the forward under another backend; the
// Mul saves 1/std before them, as there).
// Its integers: the kernel id, the plan, x's strides.
struct EagerAffine : public EagerNode<EagerAffine> {
  static Tensor run(const Tensor& x, const Tensor& c, const Tensor& a, const Tensor& b,
                    const ActAttrs& at, const fa_plan& p) {
    return affine_forward(x, c.contiguous().const_data_ptr(), a.contiguous().const_data_ptr(),
                          b.contiguous().const_data_ptr(), at, p);
  }

  std::string name() const override { return "EagerAffineBackward"; }

  // batchnorm.affine_act_backward_impl on CPU, call for call (dx only where x needs it)
  static torch::autograd::variable_list backward(const Attrs& at, std::vector<Tensor> saved,
                                                 Tensor g, const std::vector<bool>& needs) {
    Tensor x = saved[0];
    const ActAttrs a{at.name, at.ints[0], at.beta_value};
    const fa_plan p = to_plan(c10::IntArrayRef(at.ints).slice(1, FA_PLAN_FIELDS));
    const bool need_params = needs[1] || needs[2];
    if (needs_differentiable(g, {&x, &saved[1], &saved[2], &saved[3]})) {
      pybind11::gil_scoped_acquire gil;
      auto d = differentiable->affine(g, x, saved[1], saved[2], saved[3], a.name, a.beta_value,
                                      need_params)
                   .cast<std::tuple<Tensor, OptTensor, OptTensor>>();
      return {std::get<0>(d), std::get<1>(d).value_or(Tensor()),
              std::get<2>(d).value_or(Tensor())};
    }
    check_unpacked(x, g.sizes(), g.scalar_type(), "x");
    // the kernel reads C values of x's opmath a coefficient
    for (const auto& [what, i] : {std::pair{"c", 1}, std::pair{"a", 2}, std::pair{"b", 3}}) {
      check_unpacked(saved[i], {p.channels}, accumulator(x), what);
    }
    const Tensor c = saved[1].contiguous(), af = saved[2].contiguous(),
                 bf = saved[3].contiguous();
    x = as_saved(x, c10::IntArrayRef(at.ints).slice(1 + FA_PLAN_FIELDS));
    g = like(g, x);
    Tensor dx = needs[0] ? at::empty_like(x) : Tensor();
    const int64_t slots = fa_partial_slots(p);
    Tensor partial = need_params ? at::empty({2, slots}, x.options().dtype(accumulator(x)))
                                 : Tensor();
    raise_if(fa_affine_act_backward(g.data_ptr(), x.data_ptr(), ptr_of(dx), dtype_code(x),
                                    int(a.act), c.data_ptr(), af.data_ptr(), bf.data_ptr(),
                                    nullptr, float(a.beta_value), nullptr, nullptr, nullptr,
                                    nullptr, ptr_of(partial), need_params ? 2 : 0, slots, p,
                                    nullptr),
             "affine_act_backward");
    if (!need_params) return {dx, Tensor(), Tensor()};
    // batchnorm._finish: the totals of each channel's slots
    const Tensor sums = slots == p.channels ? partial : partial.view({2, -1, p.channels}).sum(1);
    return {dx, needs[1] ? sums[1] : Tensor(), needs[2] ? sums[0] : Tensor()};
  }
};

OptTensor eager_batch_norm(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                           const OptTensor& running_mean, const OptTensor& running_var,
                           bool training, double momentum, double eps, const std::string& name,
                           int64_t act, double beta_value, const std::vector<int64_t>& plan) {
  check(x, {}, {});
  const fa_plan p = to_plan(plan);
  // the plan's tiles over x's memory read the per-channel values by channel
  TORCH_CHECK(x.dim() >= 2 && x.is_non_overlapping_and_dense() && p.channels == x.size(1) &&
                  (x.numel() > p.channels || !training),
              "fused_act: eager_batch_norm takes a dense x of two dimensions or more and, in "
              "training, more than one value a channel, got sizes ", x.sizes(), " and strides ",
              x.strides());
  check_channel_plan(x, p, false, "eager_batch_norm");
  TORCH_CHECK(running_mean.has_value() == running_var.has_value() &&
                  (training || running_mean.has_value()),
              "fused_act: eager_batch_norm takes both running statistics or neither, and both "
              "in eval");
  for (const auto& [what, t] : {std::pair{"weight", &weight}, std::pair{"bias", &bias},
                                std::pair{"running_mean", &running_mean},
                                std::pair{"running_var", &running_var}}) {
    if (!*t) continue;
    check_memory(**t);
    TORCH_CHECK((*t)->device() == x.device() && (*t)->is_floating_point() &&
                    (*t)->sizes() == c10::IntArrayRef{p.channels},
                "fused_act: eager_batch_norm takes a floating ", what, " of shape (",
                p.channels, ",) on ", x.device(), ", got ", (*t)->scalar_type(), " ",
                (*t)->sizes(), " on ", (*t)->device());
  }
  // running statistics that take a gradient are the op's (None), which in eval gives them one
  // (EagerAffine's inputs are x, a and b)
  if (running_mean && (running_mean->requires_grad() || running_var->requires_grad())) {
    return std::nullopt;
  }
  const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
  const ActAttrs a{name, act, beta_value};
  if (!training) {
    // the op's eval path (affine_act on the folded running statistics), call for call
    if (!records({&x, &w, &b, &*running_mean, &*running_var})) {
      return EagerBatchNorm::run(x, w, b, *running_mean, *running_var, eps, a, p);
    }
    // as batch_norm_act's eval coefficients: a and b with autograd on, from c and 1/std of
    // the loop (the running statistics take no gradient here)
    const auto op = accumulator(x);
    const auto rows =
        EagerBatchNorm::coefficients(*running_mean, *running_var, eps, Tensor(), Tensor(), op)
            .unbind();
    const Tensor &c = rows[0], &invstd = rows[1];
    const Tensor af = w.defined() ? invstd * w.to(op) : invstd;
    const Tensor bf = b.defined() ? b.to(op) : rows[3];
    return EagerAffine::record({name, beta_value, concat({{act}, from_plan(p), x.strides()})},
                               {x, af, bf}, {x, c, af, bf},
                               [&] { return EagerAffine::run(x, c, af, bf, a, p); });
  }
  Tensor mean, var;
  {
    const at::NoGradGuard no_grad;
    Tensor partial = at::empty({3, fa_partial_slots(p)}, x.options().dtype(accumulator(x)));
    raise_if(fa_stats(x.data_ptr(), partial.data_ptr(), partial.size(1), dtype_code(x), p,
                      nullptr),
             "stats");
    std::tie(mean, var) = merge_stats(partial, p.channels);
    if (running_mean) {
      // as torch's BatchNorm: an update that no saved-tensor check sees (below the version
      // counter's kernel)
      const at::AutoDispatchBelowADInplaceOrView below;
      const int64_t m = x.numel() / p.channels;
      running_mean->mul_(1.0 - momentum).add_(mean.to(running_mean->scalar_type()), momentum);
      running_var->mul_(1.0 - momentum)
          .add_((var * (double(m) / double(m - 1))).to(running_var->scalar_type()), momentum);
    }
  }
  if (!records({&x, &w, &b})) return EagerBatchNorm::run(x, w, b, mean, var, eps, a, p);
  return EagerBatchNorm::record(
      {name, beta_value, concat({{act, c10::bit_cast<int64_t>(eps)}, from_plan(p), x.strides()})},
      {x, w, b}, {x, w, b, mean, var},
      [&] { return EagerBatchNorm::run(x, w, b, mean, var, eps, a, p); });
}

// The Python side's differentiable backwards of the eager nodes (activation, glu, max, acon,
// batch_norm, affine).
void set_differentiable_backward(pybind11::object activation, pybind11::object glu,
                                 pybind11::object max, pybind11::object acon,
                                 pybind11::object batch_norm, pybind11::object affine) {
  delete differentiable;
  differentiable = new DifferentiableBackwards{std::move(activation), std::move(glu),
                                               std::move(max), std::move(acon),
                                               std::move(batch_norm), std::move(affine)};
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_act's C++ kernels (called by fused_act/_cuda.py and _cpu.py)";
  // without the GIL, as torch's own ops run: the CPU kernels compute in the call, and other
  // Python threads go on meanwhile
  using no_gil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("act_forward", &act_forward, no_gil());
  m.def("act_backward", &act_backward, no_gil());
  m.def("acon_forward", &acon_forward, no_gil());
  m.def("acon_backward", &acon_backward, no_gil());
  m.def("max_forward", &max_forward, no_gil());
  m.def("max_backward", &max_backward, no_gil());
  m.def("max_affine", &max_affine, no_gil());
  m.def("glu_forward", &glu_forward, no_gil());
  m.def("glu_backward", &glu_backward, no_gil());
  m.def("stats", &stats, no_gil());
  m.def("affine_act_forward", &affine_act_forward, no_gil());
  m.def("affine_act_backward", &affine_act_backward, no_gil());
#ifndef FA_CPU
  // the CPU kernels have no act_quant (fused_act/_cuda.py then offers none): they quantise the
  // activation they wrote (quantize), which the CUDA ones, quantising it unwritten, need not
  m.def("act_quant", &act_quant, no_gil());
#endif
#ifdef FA_CPU
  m.def("quantize", &quantize, no_gil());
  m.def("eager_activation", &eager_activation, no_gil());
  m.def("eager_glu", &eager_glu, no_gil());
  m.def("eager_max", &eager_max, no_gil());
  m.def("fast_max", &fast_max);
  m.def("eager_acon", &eager_acon, no_gil());
  m.def("eager_batch_norm", &eager_batch_norm, no_gil());
  m.def("merge_stats", &merge_stats, no_gil());
  m.def("batch_norm_backward", &batch_norm_backward, no_gil());
  m.def("set_differentiable_backward", &set_differentiable_backward);
#endif
}
