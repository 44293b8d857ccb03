// Batch normalisation fused with the activation after it, forward and backward, as torch ops on tensors
// whose channels are the fastest axis: (N, C) rows or channels_last feature maps, i.e. a (rows, C) matrix.
//
// Why: ATen's CPU batch-norm kernels are 3-8x slower on channels_last maps than on NCHW ones, and BN,
// ReLU and their backward passes took ~half of a bf16 CNN step (benchmarks/cnn_speed.py). Here:
//   forward:  one pass for the statistics, one pass writing act(x * scale + shift);
//   backward: one pass for sum(g) and sum(g * (x - mean)), one pass writing dx.
// The maths and the loops are bn_core.h's (shared with the native MLP step); this file checks the tensors
// and makes the outputs. tests/test_native_kernels.py holds it to ATen and autograd.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "bn_core.h"

namespace bnlab {
namespace {

// a vector's values in double (nothing: `fill`)
std::vector<double> doubles(const at::Tensor& t, int64_t c, double fill) {
  std::vector<double> out(c, fill);
  if (t.defined())
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, t.scalar_type(), "doubles", [&] {
      const scalar_t* p = t.data_ptr<scalar_t>();
      for (int64_t j = 0; j < c; ++j) out[j] = double(p[j]);
    });
  return out;
}

at::Tensor tensor_of(const std::vector<double>& v, const at::TensorOptions& opts) {
  at::Tensor t = at::empty({int64_t(v.size())}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, t.scalar_type(), "tensor_of", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (size_t j = 0; j < v.size(); ++j) p[j] = scalar_t(v[j]);
  });
  return t;
}

template <typename T>
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& rm,
                                const at::Tensor& rv, bool training, double eps, int64_t a, double p) {
  using S = typename MathOf<T>::type;
  const int64_t c = x.size(1), n = x.numel();
  const auto opts = x.options().dtype(w.defined() ? w.scalar_type() : (std::is_same_v<S, double> ? at::kDouble : at::kFloat));
  std::vector<double> mean(c), var(c), invstd(c);
  if (training) {
    batch_stats(x.data_ptr<T>(), n, c, mean.data(), var.data());
  } else {
    mean = doubles(rm, c, 0.0), var = doubles(rv, c, 0.0);
  }
  for (int64_t j = 0; j < c; ++j) invstd[j] = 1.0 / std::sqrt(var[j] + eps);
  // normalised with the statistics as the returned tensors hold them (what the backward pass gets)
  at::Tensor mean_t = tensor_of(mean, opts), var_t = tensor_of(var, opts), invstd_t = tensor_of(invstd, opts);
  at::Tensor y = at::empty_like(x);
  normalize(x.data_ptr<T>(), y.data_ptr<T>(), n, c, doubles(mean_t, c, 0.0), doubles(invstd_t, c, 0.0),
            doubles(w, c, 1.0), doubles(b, c, 0.0), a, p);
  return {y, mean_t, invstd_t, var_t};
}

template <typename T>
std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                 const at::Tensor& mean_t, const at::Tensor& invstd_t, int64_t a, double p, bool need_dx) {
  const int64_t c = x.size(1);
  at::Tensor dx = need_dx ? at::empty_like(x) : at::Tensor();
  std::vector<double> dg(c), db(c);
  normalize_backward(dy.data_ptr<T>(), x.data_ptr<T>(), need_dx ? dx.data_ptr<T>() : nullptr, x.numel(), c,
                     doubles(mean_t, c, 0.0), doubles(invstd_t, c, 0.0), doubles(w, c, 1.0), doubles(b, c, 0.0), a, p,
                     dg.data(), db.data());
  return {dx, tensor_of(dg, mean_t.options()), tensor_of(db, mean_t.options())};
}


void check_layout(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), "the fused BN kernels run on the CPU (", what, " is on ", x.device(), ")");
  TORCH_CHECK(x.dim() == 2 ? x.is_contiguous() : x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "the fused BN kernels need (N, C) contiguous or (N, C, H, W) channels_last (", what, ": sizes ",
              x.sizes(), ", strides ", x.strides(), ")");
  TORCH_CHECK(x.numel() > 0, "the fused BN kernels need values: ", what, " is empty (", x.sizes(), ")");
}

at::Tensor value_or_undefined(const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); }

void check_channels(const std::optional<at::Tensor>& t, int64_t c, const char* what) {
  if (!t) return;
  TORCH_CHECK(t->dim() == 1 && t->numel() == c && t->is_contiguous(), what, " must be a contiguous vector of ", c,
              " values (got sizes ", t->sizes(), ", strides ", t->strides(), ")");
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, what,
              " must be float32 or float64 (got ", t->scalar_type(), ")");
  TORCH_CHECK(t->device().is_cpu(), what, " must be on the CPU (got ", t->device(), ")");
}

// training: batch statistics (x needs two or more rows); else running_mean / running_var.
// Returns y, mean, invstd (float32 for bfloat16 or float32 x, else x's type; the weight's if given)
// and the biased batch variance in the same type (the running variance when not training).
std::vector<at::Tensor> bn_act_forward(at::Tensor x, std::optional<at::Tensor> weight, std::optional<at::Tensor> bias,
                                       std::optional<at::Tensor> running_mean, std::optional<at::Tensor> running_var,
                                       bool training, double eps, int64_t act_code, double param) {
  check_layout(x, "the input");
  const int64_t c = x.size(1);
  for (auto [t, what] : {std::pair{&weight, "weight"}, {&bias, "bias"}, {&running_mean, "running_mean"},
                         {&running_var, "running_var"}})
    check_channels(*t, c, what);
  TORCH_CHECK(training || (running_mean && running_var), "evaluation needs running_mean and running_var");
  TORCH_CHECK(!training || x.numel() / c > 1,
              "BatchNorm needs more than one value per channel in training (got input of size ", x.sizes(), ")");
  at::NoGradGuard no_grad;
  return with_storage(x, "the fused BN kernels", "the input", [&](auto tag) {
    return forward<decltype(tag)>(x, value_or_undefined(weight), value_or_undefined(bias),
                                  value_or_undefined(running_mean), value_or_undefined(running_var), training, eps,
                                  act_code, param);
  });
}

// the gradients of the loss with respect to x (undefined unless need_dx), weight and bias, given dy at
// the activation's output and what bn_act_forward returned in training (mean, invstd)
std::vector<at::Tensor> bn_act_backward(at::Tensor dy, at::Tensor x, std::optional<at::Tensor> weight,
                                        std::optional<at::Tensor> bias, at::Tensor mean, at::Tensor invstd,
                                        int64_t act_code, double param, bool need_dx) {
  check_layout(x, "the input");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), "the gradient must match the input: ",
              x.scalar_type(), " ", x.sizes(), " (got ", dy.scalar_type(), " ", dy.sizes(), ")");
  const int64_t c = x.size(1);
  check_channels(weight, c, "weight");
  check_channels(bias, c, "bias");
  check_channels(mean, c, "mean");
  check_channels(invstd, c, "invstd");
  at::NoGradGuard no_grad;
  at::Tensor g = dy.contiguous(x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  return with_storage(x, "the fused BN kernels", "the input", [&](auto tag) {
    return backward<decltype(tag)>(g, x, value_or_undefined(weight), value_or_undefined(bias), mean, invstd, act_code,
                                   param, need_dx);
  });
}

}  // namespace
}  // namespace bnlab

TORCH_LIBRARY_FRAGMENT(bnlab_native, m) {
  m.def("bn_act_forward", &bnlab::bn_act_forward);
  m.def("bn_act_backward", &bnlab::bn_act_backward);
}
