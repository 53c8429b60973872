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
// or a transform's wrapper has no storage of its own, and its data pointer is not its data.
void check_memory(const Tensor& t) {
  TORCH_CHECK(t.defined() && t.has_storage() && !t.key_set().has(c10::DispatchKey::Python),
              "fused_act ", KIND, " kernels: a tensor without plain storage of its own (a tensor "
              "subclass or a transform's wrapper) cannot reach a kernel");
}

void check(const Tensor& x, std::initializer_list<const Tensor*> data,
           std::initializer_list<const Tensor*> params) {
  TORCH_CHECK(x.device().type() == DEVICE, "fused_act ", KIND, " kernels need ", KIND,
              " tensors, got ", x.device());
  check_memory(x);
  for (const Tensor* t : data) check_memory(*t);
  for (const Tensor* t : params) check_memory(*t);
  const auto op = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
fa_plan to_plan(const std::vector<int64_t>& p) {
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

// The eager path of an activation without a beta tensor on CPU tensors
// (fused_act/ops/eager.py, run_activation): a C++ autograd node, as torch's own ops have,
// in place of the Python Function's bookkeeping, which cost more than the kernels on small
// tensors.  The same kernels and flat plan as the op's "cpu" backend (plan.flat, SCALAR), so
// the results are the op's bit for bit; it saves x only.  A backward that needs a graph of its
// own (create_graph) or gets a gradient autograd cannot hand a kernel (batched, a subclass)
// calls the Python side's differentiable backward instead.
pybind11::object* differentiable_backward = nullptr;  // kept to the end: no destructor at exit
pybind11::object* differentiable_glu_backward = nullptr;  // EagerGlu's

fa_plan flat_plan(int64_t n, int64_t block) { return fa_plan{1, n, 1, 0, 1, int32_t(block), 1, 0}; }

// Whether an eager node's backward must run the Python side's differentiable backward: a graph
// of its own (create_graph), a torch.func transform over it, or a gradient or saved tensor the
// kernels cannot take (batched, a subclass, another dtype or device).
bool needs_differentiable(const Tensor& g, const Tensor& x) {
  constexpr auto wrapped = c10::DispatchKeySet({c10::DispatchKey::Batched,
                                                c10::DispatchKey::FuncTorchBatched,
                                                c10::DispatchKey::FuncTorchGradWrapper,
                                                c10::DispatchKey::Python});
  // a torch.func transform over the backward (as _are_functorch_transforms_active): what
  // empty_like makes there has no storage for a kernel
  const auto included = c10::impl::tls_local_dispatch_key_set().included_;
  const bool transformed = included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
                           included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
  return at::GradMode::is_enabled() || transformed || g.key_set().has_any(wrapped) ||
         x.key_set().has_any(wrapped) || g.scalar_type() != x.scalar_type() ||
         g.device() != x.device() || !x.is_cpu();
}

// a saved tensor as the kernels read it: a saved-tensor hook's unpack may give a view
Tensor dense_saved(const Tensor& x) { return x.is_non_overlapping_and_dense() ? x : x.contiguous(); }

struct EagerActivation : public torch::autograd::Function<EagerActivation> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                        const std::string& name, int64_t act, double beta_value, int64_t block) {
    ctx->save_for_backward({x});
    ctx->saved_data["name"] = name;
    ctx->saved_data["act"] = act;
    ctx->saved_data["beta_value"] = beta_value;
    ctx->saved_data["block"] = block;
    Tensor y = at::empty_like(x);
    raise_if(fa_act_forward(x.data_ptr(), y.data_ptr(), dtype_code(x), int(act), nullptr,
                            float(beta_value), flat_plan(x.numel(), block), nullptr),
             "act_forward");
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    Tensor x = ctx->get_saved_variables()[0];
    const int64_t act = ctx->saved_data["act"].toInt();
    const double beta_value = ctx->saved_data["beta_value"].toDouble();
    Tensor g = grads[0];
    if (needs_differentiable(g, x)) {
      pybind11::gil_scoped_acquire gil;
      Tensor dx = (*differentiable_backward)(g, x, ctx->saved_data["name"].toStringRef(),
                                             beta_value).cast<Tensor>();
      return {dx, Tensor(), Tensor(), Tensor(), Tensor()};
    }
    x = dense_saved(x);
    if (g.strides() != x.strides()) {  // e.g. the expanded gradient of a sum
      g = at::empty_like(x).copy_(g);
    }
    Tensor dx = at::empty_like(x);
    raise_if(fa_act_backward(g.data_ptr(), x.data_ptr(), dx.data_ptr(), dtype_code(x), int(act),
                             nullptr, float(beta_value), nullptr,
                             flat_plan(x.numel(), ctx->saved_data["block"].toInt()), nullptr),
             "act_backward");
    return {dx, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor eager_activation(const Tensor& x, const std::string& name, int64_t act,
                        double beta_value, int64_t block) {
  check(x, {}, {});
  // one flat pass over x's memory: any dense layout, its output of the same strides
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "fused_act: eager_activation takes a dense x");
  return EagerActivation::apply(x, name, act, beta_value, block);
}

// The eager path of act(gate) * up on two contiguous CPU tensors of one shape and dtype without
// a beta tensor (fused_act/ops/eager.py, run_glu), as EagerActivation's: the op's kernels and
// flat plan, bit for bit; it saves gate and up.
struct EagerGlu : public torch::autograd::Function<EagerGlu> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& gate,
                        const Tensor& up, const std::string& name, int64_t act,
                        double beta_value, int64_t block) {
    ctx->save_for_backward({gate, up});
    ctx->saved_data["name"] = name;
    ctx->saved_data["act"] = act;
    ctx->saved_data["beta_value"] = beta_value;
    ctx->saved_data["block"] = block;
    Tensor out = at::empty_like(gate);
    const int64_t n = gate.numel(), rows[3] = {n, n, n};
    raise_if(fa_glu_forward(gate.data_ptr(), up.data_ptr(), out.data_ptr(), rows,
                            dtype_code(gate), int(act), nullptr, float(beta_value),
                            flat_plan(n, block), nullptr),
             "glu_forward");
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    Tensor gate = saved[0], up = saved[1], g = grads[0];
    const double beta_value = ctx->saved_data["beta_value"].toDouble();
    if (needs_differentiable(g, gate) || needs_differentiable(g, up)) {
      pybind11::gil_scoped_acquire gil;
      auto d = (*differentiable_glu_backward)(g, gate, up, ctx->saved_data["name"].toStringRef(),
                                              beta_value).cast<std::tuple<Tensor, Tensor>>();
      return {std::get<0>(d), std::get<1>(d), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    gate = gate.contiguous();  // a saved-tensor hook's unpack may give any view
    up = up.contiguous();
    g = g.contiguous();
    Tensor dgate = at::empty_like(gate), dup = at::empty_like(gate);
    const int64_t n = gate.numel(), rows[5] = {n, n, n, n, n};
    raise_if(fa_glu_backward(g.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(),
                             dup.data_ptr(), rows, dtype_code(gate),
                             int(ctx->saved_data["act"].toInt()), nullptr, float(beta_value),
                             nullptr, flat_plan(n, ctx->saved_data["block"].toInt()), nullptr),
             "glu_backward");
    return {dgate, dup, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor eager_glu(const Tensor& gate, const Tensor& up, const std::string& name, int64_t act,
                 double beta_value, int64_t block) {
  check(gate, {&up}, {});
  // one flat pass over both: contiguous, of one shape
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous() && gate.sizes() == up.sizes(),
              "fused_act: eager_glu takes contiguous gate and up of one shape, got ",
              gate.sizes(), " and ", up.sizes());
  return EagerGlu::apply(gate, up, name, act, beta_value, block);
}

// The Python side's differentiable backwards of the eager nodes (activation, glu).
void set_differentiable_backward(pybind11::object fn, pybind11::object glu_fn) {
  delete differentiable_backward;
  delete differentiable_glu_backward;
  differentiable_backward = new pybind11::object(std::move(fn));
  differentiable_glu_backward = new pybind11::object(std::move(glu_fn));
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
  m.def("set_differentiable_backward", &set_differentiable_backward);
#endif
}
