// One training step of an MLP (Linear / BatchNorm / activation layers, mean cross-entropy on
// logits) in a single call: forward, explicit backward and the parameter update, with plain loops
// for everything but the GEMMs (which go to ATen, i.e. MKL / oneDNN) and BN (bn_core.h: the fused CNN
// step's kernels). BN and the activation after it stay two ops here: at MLP sizes, recomputing the
// activation in the backward pass costs more than the pass it saves (a sigmoid MLP step at batch 60:
// 240 -> 432 us, measured).
//
// Why: at batch 32 the Python fused step (bnlab/train/fused.py) spends more time dispatching ~40
// small ops than computing; here the only dispatched ops are the ~7 matrix products.
// The maths is exactly that of fused.py (and therefore of autograd): BN normalises with the biased
// batch variance; tests/test_train.py proves the match.
//
// The network arrives as a flat program (see bnlab/train/native.py, which builds it):
//   codes:   per op, [kind, arg]          kind 0 Linear, 1 BatchNorm, 2 activation (arg = which)
//   tensors: per op, SLOTS optional tensors
//     Linear:    weight, bias, weight grad, bias grad
//     BatchNorm: weight, bias, weight grad, bias grad, running mean, running var, num_batches_tracked
//   scalars: per op, SLOTS doubles
//     BatchNorm: eps, factor f (weight of the new statistic; < 0: cumulative average 1/n), the
//                variance correction (m/(m-1) or 1), update running statistics (0/1). native.py sets
//                f and the correction from bnlab.conventions.running_update per batch size
//                (set_scalars); only momentum=None's 1/n is computed here, tested against that rule.
//     activation: its parameter (negative slope, alpha)
// Gradients go to the grad tensors when given (an optimizer steps later), else plain SGD with
// learning rate `lr` is applied in place (weight matrices inside the backward GEMM: W.addmm_(dyᵀ, h)).
// Running statistics are updated in the forward pass from the batch's own mean and biased variance
// in double (not rebuilt from 1/sqrt(var + eps), which loses digits when var << eps), blended as
// (1 - f)·old + f·new: exact at f = 0 and 1, where old + f·(new - old) in float32 stores 0 for a
// variance of 1e-9 against an old value of 1.
// Intermediates live in buffers kept across steps. The loops are written to auto-vectorise; the
// library is built with -march=native (see native.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "activations.h"
#include "bn_core.h"

namespace {

constexpr int64_t SLOTS = 7;
enum Kind : int64_t { LINEAR = 0, BATCHNORM = 1, ACTIVATION = 2 };

enum Buf : int64_t { OUT = 0, MEAN, INVSTD, DX, BUFS_PER_OP };  // per op, then one for d loss / d logits

struct Saved {  // what the backward pass needs from the forward pass, per op
  at::Tensor in, out, mean, invstd;
};

// a BN op's constants for bn_core.h, in double: the statistics as their buffers hold them, gamma and beta
// (1 and 0 where absent)
template <typename T>
void bn_constants(const at::Tensor* ts, const at::Tensor& mean, const at::Tensor& invstd, int64_t c,
                  std::vector<double>* out) {
  const T *m = mean.data_ptr<T>(), *inv = invstd.data_ptr<T>();
  const T* g = ts[0].defined() ? ts[0].data_ptr<T>() : nullptr;
  const T* b = ts[1].defined() ? ts[1].data_ptr<T>() : nullptr;
  for (int k = 0; k < 4; ++k) out[k].resize(c);
  for (int64_t j = 0; j < c; ++j) {
    out[0][j] = m[j], out[1][j] = inv[j], out[2][j] = g ? double(g[j]) : 1.0, out[3][j] = b ? double(b[j]) : 0.0;
  }
}

// the activation of `kind` over m values (activations.h holds the formulas)
template <typename T>
void act_forward(int64_t kind, double p, const T* x, T* y, int64_t m) {
  bnlab::with_act(kind, [&](auto A) {
    for (int64_t i = 0; i < m; ++i) y[i] = bnlab::act<decltype(A)::value>(x[i], T(p));
  });
}

// the gradient g through the activation, in place, from its input x and output y
template <typename T>
void act_backward(int64_t kind, double p, T* __restrict g, const T* __restrict x, const T* __restrict y, int64_t m) {
  bnlab::with_act(kind, [&](auto A) {
    for (int64_t i = 0; i < m; ++i) g[i] = bnlab::act_backward<decltype(A)::value>(g[i], x[i], y[i], T(p));
  });
}

// mean cross-entropy, number correct, and d loss / d logits = (softmax - onehot) / n
template <typename T>
void softmax_xent(const T* logits, const int64_t* y, T* dlogits, int64_t n, int64_t k, double* loss,
                  int64_t* correct) {
  double total = 0;
  int64_t right = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T* row = logits + i * k;
    T* g = dlogits + i * k;
    int64_t best = 0;
    T mx = row[0];
    for (int64_t j = 1; j < k; ++j)
      if (row[j] > mx || std::isnan(row[j])) { mx = row[j]; best = j; if (std::isnan(mx)) break; }
    T s = 0;
    for (int64_t j = 0; j < k; ++j) s += std::exp(row[j] - mx);
    T lse = mx + std::log(s);
    const int64_t t = y[i];  // range checked before the step began
    total -= static_cast<double>(row[t] - lse);
    right += best == t;
    for (int64_t j = 0; j < k; ++j) g[j] = std::exp(row[j] - lse) / T(n);
    g[t] -= T(1) / T(n);
  }
  *loss = total / n;
  *correct = right;
}

template <typename T>
void sgd_or_grad(const at::Tensor& param, const at::Tensor& grad_slot, const T* g, double lr) {
  int64_t m = param.numel();
  if (grad_slot.defined()) {
    T* dst = grad_slot.data_ptr<T>();
    for (int64_t i = 0; i < m; ++i) dst[i] = g[i];
  } else {
    T* p = param.data_ptr<T>();
    for (int64_t i = 0; i < m; ++i) p[i] -= T(lr) * g[i];
  }
}

// running = (1 - f)·running + f·batch, in double; mean and var (biased) in double
template <typename T>
void update_running(const at::Tensor* t, const double* s, const double* mean, const double* var, int64_t c) {
  const at::Tensor &rm = t[4], &rv = t[5], &nbt = t[6];
  if (!s[3] || !rm.defined()) return;
  double f = s[1];
  if (nbt.defined()) {
    int64_t* count = nbt.data_ptr<int64_t>();
    *count += 1;
    if (f < 0) f = 1.0 / static_cast<double>(*count);  // momentum=None (rule: bnlab.conventions.running_update)
  }
  const double keep = 1.0 - f, correction = s[2];
  T* m = rm.data_ptr<T>();
  T* v = rv.data_ptr<T>();
  for (int64_t j = 0; j < c; ++j) {
    m[j] = static_cast<T>(keep * m[j] + f * mean[j]);
    v[j] = static_cast<T>(keep * v[j] + f * (var[j] * correction));
  }
}

struct MLPProgram : torch::CustomClassHolder {
  std::vector<at::Tensor> t;  // SLOTS per op
  std::vector<int64_t> codes;  // 2 per op
  std::vector<double> scalars;  // SLOTS per op
  int64_t ops;
  int64_t first_trainable = -1;  // ops before it need no input gradient
  at::ScalarType dtype = at::kFloat;
  int64_t in_features = -1, classes = -1;  // -1: not known (checked by ATen instead)
  std::vector<Saved> saved;
  std::vector<double> stat_mean, stat_var;  // a BN's batch mean and biased variance, in double
  std::vector<double> consts[4];  // a BN's mean, invstd, gamma, beta for bn_core.h
  // every intermediate lives in a buffer kept across steps: a fresh ~1 MB tensor per step would be
  // mmap'ed, page-faulted and unmapped each time, which costs more than the GEMM that fills it
  std::vector<at::Tensor> bufs;

  at::Tensor& buffer(size_t id, at::IntArrayRef sizes, const at::TensorOptions& opts) {
    at::Tensor& b = bufs.at(id);  // sized once in the constructor: references stay valid
    if (!b.defined() || b.sizes() != sizes || b.scalar_type() != opts.dtype().toScalarType())
      b = at::empty(sizes, opts);
    return b;
  }

  MLPProgram(c10::List<std::optional<at::Tensor>> tensors, std::vector<int64_t> codes_, std::vector<double> scalars_)
      : codes(std::move(codes_)), scalars(std::move(scalars_)) {
    ops = static_cast<int64_t>(codes.size()) / 2;
    TORCH_CHECK(ops > 0 && static_cast<int64_t>(tensors.size()) == ops * SLOTS &&
                    static_cast<int64_t>(scalars.size()) == ops * SLOTS,
                "malformed program: ", ops, " ops, ", tensors.size(), " tensors, ", scalars.size(), " scalars");
    for (size_t i = 0; i < tensors.size(); ++i) {
      std::optional<at::Tensor> ti = tensors[i];
      t.push_back(ti.has_value() ? *ti : at::Tensor());
    }
    for (const at::Tensor& ti : t)
      if (ti.defined() && ti.is_floating_point()) { dtype = ti.scalar_type(); break; }
    for (int64_t o = 0; o < ops && in_features < 0; ++o) {
      const at::Tensor* ts = &t[o * SLOTS];
      if (codes[2 * o] == LINEAR) in_features = ts[0].size(1);
      else if (codes[2 * o] == BATCHNORM && (ts[0].defined() || ts[4].defined()))
        in_features = (ts[0].defined() ? ts[0] : ts[4]).numel();
    }
    for (int64_t o = ops - 1; o >= 0 && classes < 0; --o)
      if (codes[2 * o] == LINEAR) classes = t[o * SLOTS].size(0);
    for (int64_t o = 0; o < ops && first_trainable < 0; ++o)
      if (codes[2 * o] != ACTIVATION && (t[o * SLOTS].defined() || t[o * SLOTS + 1].defined())) first_trainable = o;
    bufs.resize(BUFS_PER_OP * ops + 1);
  }

  template <typename T>
  std::vector<at::Tensor> run(const at::Tensor& x, const at::Tensor& y, double lr) {
    const int64_t n = x.size(0);
    saved.resize(ops);
    at::Tensor h = x.reshape({n, -1}).contiguous();
    auto opts = h.options();
    for (int64_t o = 0; o < ops; ++o) {
      const int64_t kind = codes[2 * o], arg = codes[2 * o + 1];
      const at::Tensor* ts = &t[o * SLOTS];
      const double* s = &scalars[o * SLOTS];
      Saved& sv = saved[o];
      sv.in = h;
      if (kind == LINEAR) {
        at::Tensor& out = buffer(BUFS_PER_OP * o + OUT, {n, ts[0].size(0)}, opts);
        if (ts[1].defined())
          at::addmm_out(out, ts[1], h, ts[0].t());
        else
          at::mm_out(out, h, ts[0].t());
        h = out;
      } else if (kind == BATCHNORM) {
        const int64_t c = h.size(1);
        TORCH_CHECK(n > 1, "BatchNorm needs more than one value per channel in training (got a batch of 1)");
        at::Tensor& out = buffer(BUFS_PER_OP * o + OUT, h.sizes(), opts);
        sv.mean = buffer(BUFS_PER_OP * o + MEAN, {c}, opts);
        sv.invstd = buffer(BUFS_PER_OP * o + INVSTD, {c}, opts);
        stat_mean.resize(c);
        stat_var.resize(c);
        bnlab::batch_stats(h.data_ptr<T>(), h.numel(), c, stat_mean.data(), stat_var.data());
        T *m = sv.mean.data_ptr<T>(), *inv = sv.invstd.data_ptr<T>();
        for (int64_t j = 0; j < c; ++j)
          m[j] = static_cast<T>(stat_mean[j]), inv[j] = static_cast<T>(1.0 / std::sqrt(stat_var[j] + s[0]));
        bn_constants<T>(ts, sv.mean, sv.invstd, c, consts);
        bnlab::normalize(h.data_ptr<T>(), out.data_ptr<T>(), h.numel(), c, consts[0], consts[1], consts[2], consts[3],
                         bnlab::IDENTITY, 0.0);
        update_running<T>(ts, s, stat_mean.data(), stat_var.data(), c);
        h = out;
      } else {
        at::Tensor& out = buffer(BUFS_PER_OP * o + OUT, h.sizes(), opts);
        act_forward<T>(arg, s[0], h.data_ptr<T>(), out.data_ptr<T>(), h.numel());
        h = out;
      }
      sv.out = h;
    }
    at::Tensor dy = buffer(BUFS_PER_OP * ops, h.sizes(), opts);
    double loss = 0;
    int64_t correct = 0;
    softmax_xent<T>(h.data_ptr<T>(), y.data_ptr<int64_t>(), dy.data_ptr<T>(), n, h.size(1), &loss, &correct);
    std::vector<T> vec;  // a Linear's bias gradient
    for (int64_t o = ops - 1; o >= 0 && o >= first_trainable; --o) {
      const int64_t kind = codes[2 * o], arg = codes[2 * o + 1];
      const at::Tensor* ts = &t[o * SLOTS];
      Saved& sv = saved[o];
      const bool need_dx = o > first_trainable;
      if (kind == LINEAR) {
        if (ts[1].defined()) {
          const int64_t out = dy.size(1);
          vec.assign(out, T(0));
          const T* g = dy.data_ptr<T>();
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < out; ++j) vec[j] += g[i * out + j];
          sgd_or_grad<T>(ts[1], ts[3], vec.data(), lr);
        }
        const at::Tensor& w = ts[0];
        at::Tensor dx;
        if (need_dx) dx = at::mm_out(buffer(BUFS_PER_OP * o + DX, sv.in.sizes(), opts), dy, w);  // with W before its update
        if (ts[2].defined())
          at::mm_out(const_cast<at::Tensor&>(ts[2]), dy.t(), sv.in);
        else
          const_cast<at::Tensor&>(w).addmm_(dy.t(), sv.in, 1.0, -lr);
        dy = dx;
      } else if (kind == BATCHNORM) {
        const int64_t c = dy.size(1);
        at::Tensor dx = need_dx ? buffer(BUFS_PER_OP * o + DX, dy.sizes(), opts) : at::Tensor();
        bn_constants<T>(ts, sv.mean, sv.invstd, c, consts);  // gamma before its update
        std::vector<double> dg(c), db(c);
        bnlab::normalize_backward(dy.data_ptr<T>(), sv.in.data_ptr<T>(), need_dx ? dx.data_ptr<T>() : nullptr,
                                  dy.numel(), c, consts[0], consts[1], consts[2], consts[3], bnlab::IDENTITY, 0.0,
                                  dg.data(), db.data());
        std::vector<T> dgamma(dg.begin(), dg.end()), dbeta(db.begin(), db.end());
        if (ts[0].defined()) sgd_or_grad<T>(ts[0], ts[2], dgamma.data(), lr);
        if (ts[1].defined()) sgd_or_grad<T>(ts[1], ts[3], dbeta.data(), lr);
        dy = dx;
      } else if (need_dx) {
        act_backward<T>(arg, scalars[o * SLOTS], dy.data_ptr<T>(), sv.in.data_ptr<T>(), sv.out.data_ptr<T>(),
                        dy.numel());
      }
    }
    return {at::scalar_tensor(loss, opts), at::scalar_tensor(correct, at::kLong)};
  }

  // replaces the per-op scalars (native.py sets each BN's factor and variance correction per batch size)
  void set_scalars(std::vector<double> scalars_) {
    TORCH_CHECK(scalars_.size() == scalars.size(), "expected ", scalars.size(), " scalars (got ", scalars_.size(), ")");
    scalars = std::move(scalars_);
  }

  std::vector<at::Tensor> step(at::Tensor x, at::Tensor y, double lr) {
    TORCH_CHECK(x.device().is_cpu(), "the native MLP step runs on the CPU (got ", x.device(), ")");
    TORCH_CHECK(y.scalar_type() == at::kLong && y.dim() == 1 && y.size(0) == x.size(0),
                "targets must be int64 of shape (", x.size(0), ",) (got ", y.scalar_type(), " ", y.sizes(), ")");
    TORCH_CHECK(x.dim() >= 2 && x.size(0) >= 1, "need a batch of shape (N, features...) (got ", x.sizes(), ")");
    TORCH_CHECK(x.scalar_type() == dtype, "inputs are ", x.scalar_type(), " but the model is ", dtype);
    // everything is checked before anything is written: a bad batch leaves the model as it was
    TORCH_CHECK(in_features < 0 || x.numel() == x.size(0) * in_features, "the model takes ", in_features,
                " input features per example but the batch has shape ", x.sizes());
    at::Tensor yc = y.contiguous();
    const int64_t* yp = yc.data_ptr<int64_t>();
    for (int64_t i = 0; i < yc.numel(); ++i)
      TORCH_CHECK(yp[i] >= 0 && yp[i] < classes, "target ", yp[i], " is out of bounds for ", classes, " classes");
    at::AutoDispatchBelowADInplaceOrView guard;  // no autograd: parameters are updated in place
    if (x.scalar_type() == at::kDouble) return run<double>(x, yc, lr);
    TORCH_CHECK(x.scalar_type() == at::kFloat, "the native MLP step needs float32 or float64 (got ", x.scalar_type(), ")");
    return run<float>(x, yc, lr);
  }
};

}  // namespace

TORCH_LIBRARY(bnlab_native, m) {
  m.class_<MLPProgram>("MLPProgram")
      .def(torch::init<c10::List<std::optional<at::Tensor>>, std::vector<int64_t>, std::vector<double>>())
      .def("step", &MLPProgram::step)
      .def("set_scalars", &MLPProgram::set_scalars);
}
