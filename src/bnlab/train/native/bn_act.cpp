// Batch normalisation fused with the activation after it, forward and backward, for tensors whose
// channels are the fastest axis: (N, C) rows or channels_last feature maps, i.e. a (rows, C) matrix.
//
// Why: ATen's CPU batch-norm kernels are 3-8x slower on channels_last maps than on NCHW ones, and BN,
// ReLU and their backward passes took ~half of a bf16 CNN step (benchmarks/cnn_speed.py). Here:
//   forward:  one pass for the statistics, one pass writing act(x * scale + shift);
//   backward: one pass for sum(g) and sum(g * (x - mean)) with g = dy * act'(z), z recomputed from x
//             (nothing saved but x), one pass writing dx;
// with the channels of a block of BLOCK rows summed in vector registers (lanes.h), so each pass runs
// at memory speed.
//
// Maths (the same as bnlab.nn.BatchNorm and ATen's kernels): biased batch variance, eps inside the
// root, y = act((x - mean) * invstd * gamma + beta), and the usual input gradient
// dx = (g - mean(g) - (x - mean) * invstd^2 * mean(g * (x - mean))) * invstd * gamma.
// The statistics are sums of x - ref (ref: the mean of the first rows; one pass, no cancellation when
// |mean| >> std) accumulated in the maths type over 64 periods, then in double; the variance is returned as computed (not rebuilt from invstd, which loses it when var << eps).
// bfloat16 inputs run their maths in float with float statistics, as ATen's mixed-type kernels.
// tests/test_native_kernels.py holds it to ATen and autograd.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <utility>
#include <vector>

#include "activations.h"
#include "lanes.h"

namespace bnlab {
namespace {

// The (rows, C) matrix is walked as one flat array, `len` values at a time: len = lcm(C, lanes) is a
// whole number of rows and of packs, so each per-channel constant becomes an array of len values (its C
// values repeated) read at the same offset as the data, and every pack is whole (no row ends inside).
constexpr int64_t MAX_PERIOD = 8192;  // beyond it (a large odd C) the walk goes one value at a time
constexpr int64_t FLUSH = 64;         // periods summed in the maths type before the sums meet the doubles
constexpr int64_t MIN_TASK = 32768;   // values per thread below which a pass is not split
constexpr int64_t REF_ROWS = 256;     // rows whose mean shifts the statistics' sums

// f(V{}, len): V the 64-byte pack of S when its period fits MAX_PERIOD, else S itself (len = C)
template <typename S, typename F> void with_width(int64_t c, F&& f) {
  const int64_t len = c / std::gcd(c, int64_t(lanes<S, 64>)) * lanes<S, 64>;
  if (len <= MAX_PERIOD) f(Vec<S, 64>{}, len);
  else f(S{}, c);
}

template <typename S> std::vector<S> repeated(const std::vector<double>& v, int64_t len) {
  std::vector<S> out(len);
  for (int64_t k = 0; k < len; ++k) out[k] = S(v[k % v.size()]);
  return out;
}

// f(i, k, W{}) for the values at flat offset i (a pack, or a single value in the last partial period)
// whose constants sit at offset k of the repeated arrays
template <typename V, typename S, typename F> void each(int64_t n, int64_t len, F&& f) {
  const int64_t periods = n / len;
  at::parallel_for(0, periods, std::max<int64_t>(1, MIN_TASK / len), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t k = 0; k < len; k += lane_count<V>()) f(p * len + k, k, V{});
  });
  for (int64_t i = periods * len; i < n; ++i) f(i, i - periods * len, S{});
}

template <typename V> inline void add_into(double* dst, V v) {
  if constexpr (std::is_arithmetic_v<V>) {
    *dst += v;
  } else {
    for (int i = 0; i < lane_count<V>(); ++i) dst[i] += v[i];
  }
}

// per-channel sums of the two quantities term(i, k, W{}) returns, over every value: for each pack
// offset k of a period, summed in registers of the maths type S down FLUSH periods (four chains, so
// the adds overlap; the block stays in L1 while its packs are visited), then in double
template <typename V, typename S, typename F> std::vector<double> sums(int64_t n, int64_t c, int64_t len, F&& term) {
  const int64_t periods = n / len, threads = at::get_num_threads();
  std::vector<double> part(threads * 2 * len, 0.0);
  at::parallel_for(0, periods, std::max<int64_t>(1, MIN_TASK / len), [&](int64_t p0, int64_t p1) {
    double* d = part.data() + at::get_thread_num() * 2 * len;
    for (int64_t q0 = p0; q0 < p1; q0 += FLUSH) {
      const int64_t q1 = std::min(q0 + FLUSH, p1);
      for (int64_t k = 0; k < len; k += lane_count<V>()) {
        V a[4] = {}, b[4] = {};
        int64_t p = q0;
        for (; p + 4 <= q1; p += 4)
          for (int u = 0; u < 4; ++u) {
            std::pair<V, V> t = term((p + u) * len + k, k, V{});
            a[u] += t.first;
            b[u] += t.second;
          }
        for (; p < q1; ++p) {
          std::pair<V, V> t = term(p * len + k, k, V{});
          a[0] += t.first;
          b[0] += t.second;
        }
        add_into(d + k, (a[0] + a[1]) + (a[2] + a[3]));
        add_into(d + len + k, (b[0] + b[1]) + (b[2] + b[3]));
      }
    }
  });
  std::vector<double> total(2 * c, 0.0);
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t k = 0; k < len; ++k) {
      total[k % c] += part[t * 2 * len + k];
      total[c + k % c] += part[t * 2 * len + len + k];
    }
  for (int64_t i = periods * len; i < n; ++i) {
    std::pair<S, S> t = term(i, i - periods * len, S{});
    total[i % c] += t.first;
    total[c + i % c] += t.second;
  }
  return total;
}

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

// the normalisation's constants, repeated over a period: z = (x - mean) * scale + beta, scale = invstd * gamma
// (x - mean first: no cancellation between x * scale and a shift of the same size when |mean| >> std)
template <typename S> struct Affine {
  std::vector<S> scale, beta, mean;

  Affine(const std::vector<double>& m, const std::vector<double>& inv, const std::vector<double>& w,
         const std::vector<double>& b, int64_t len) {
    const size_t c = m.size();
    std::vector<double> sc(c);
    for (size_t j = 0; j < c; ++j) sc[j] = inv[j] * w[j];
    scale = repeated<S>(sc, len), beta = repeated<S>(b, len), mean = repeated<S>(m, len);
  }

  template <typename V> V z(V x, int64_t k) const {
    return (x - load<V>(&mean[k])) * load<V>(&scale[k]) + load<V>(&beta[k]);
  }
};

template <typename T>
std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& rm,
                                const at::Tensor& rv, bool training, double eps, int64_t a, double p) {
  using S = typename MathOf<T>::type;
  const int64_t c = x.size(1), n = x.numel(), rows = n / c;
  const T* xp = x.data_ptr<T>();
  const auto opts = x.options().dtype(w.defined() ? w.scalar_type() : (std::is_same_v<S, double> ? at::kDouble : at::kFloat));
  at::Tensor y = at::empty_like(x), mean_t, var_t, invstd_t;
  T* yp = y.data_ptr<T>();
  with_width<S>(c, [&](auto tag, int64_t len) {
    using V = decltype(tag);
    std::vector<double> mean(c), var(c), invstd(c);
    if (training) {
      // shifted by the mean of the first rows (at most REF_ROWS), so the sums stay small even when one
      // row is far from the others (a float sum of x - x[0] lost 1e-4 of the variance to an outlying x[0])
      std::vector<double> first(c, 0.0);
      const int64_t head = std::min(rows, REF_ROWS);
      for (int64_t r = 0; r < head; ++r)
        for (int64_t j = 0; j < c; ++j) first[j] += double(load<S>(xp + r * c + j));
      for (int64_t j = 0; j < c; ++j) first[j] = double(S(first[j] / head));  // in S: d = x - ref exactly as summed
      const std::vector<S> ref = repeated<S>(first, len);
      std::vector<double> s = sums<V, S>(n, c, len, [&](int64_t i, int64_t k, auto t) {
        using W = decltype(t);
        const W d = load<W>(xp + i) - load<W>(&ref[k]);
        return std::pair<W, W>(d, d * d);
      });
      for (int64_t j = 0; j < c; ++j) {
        const double m1 = s[j] / rows;
        mean[j] = first[j] + m1;
        var[j] = std::max(s[c + j] / rows - m1 * m1, 0.0);
      }
    } else {
      mean = doubles(rm, c, 0.0), var = doubles(rv, c, 0.0);
    }
    for (int64_t j = 0; j < c; ++j) invstd[j] = 1.0 / std::sqrt(var[j] + eps);
    // normalised with the statistics as the returned tensors hold them (what the backward pass gets)
    mean_t = tensor_of(mean, opts), var_t = tensor_of(var, opts), invstd_t = tensor_of(invstd, opts);
    const Affine<S> aff(doubles(mean_t, c, 0.0), doubles(invstd_t, c, 0.0), doubles(w, c, 1.0), doubles(b, c, 0.0), len);
    with_act(a, [&](auto A) {
      each<V, S>(n, len, [&](int64_t i, int64_t k, auto t) {
        using W = decltype(t);
        store(yp + i, act<decltype(A)::value>(aff.z(load<W>(xp + i), k), S(p)));
      });
    });
  });
  return {y, mean_t, invstd_t, var_t};
}

template <typename T>
std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                 const at::Tensor& mean_t, const at::Tensor& invstd_t, int64_t a, double p, bool need_dx) {
  using S = typename MathOf<T>::type;
  const int64_t c = x.size(1), n = x.numel(), rows = n / c;
  const T *xp = x.data_ptr<T>(), *gp = dy.data_ptr<T>();
  const std::vector<double> mean = doubles(mean_t, c, 0.0), inv = doubles(invstd_t, c, 0.0), gamma = doubles(w, c, 1.0);
  at::Tensor dx = need_dx ? at::empty_like(x) : at::Tensor(), dgamma, dbeta;
  with_width<S>(c, [&](auto tag, int64_t len) {
    using V = decltype(tag);
    const Affine<S> aff(mean, inv, gamma, doubles(b, c, 0.0), len);
    with_act(a, [&](auto A) {
      constexpr Act K = decltype(A)::value;
      // the gradient reaching the normalised value z, through the activation (z recomputed from x)
      auto grad_at = [&](int64_t i, int64_t k, auto xv) {
        using W = decltype(xv);
        const W z = aff.z(xv, k);
        return act_backward<K>(load<W>(gp + i), z, act<K>(z, S(p)), S(p));
      };
      std::vector<double> s = sums<V, S>(n, c, len, [&](int64_t i, int64_t k, auto t) {
        using W = decltype(t);
        const W xv = load<W>(xp + i), g = grad_at(i, k, xv);
        return std::pair<W, W>(g, g * (xv - load<W>(&aff.mean[k])));
      });
      std::vector<double> dg(c), db(c), gmean(c), slope(c), wv(c);
      for (int64_t j = 0; j < c; ++j) {
        dg[j] = s[c + j] * inv[j], db[j] = s[j];
        gmean[j] = s[j] / rows, slope[j] = s[c + j] * inv[j] * inv[j] / rows, wv[j] = inv[j] * gamma[j];
      }
      dgamma = tensor_of(dg, mean_t.options()), dbeta = tensor_of(db, mean_t.options());
      if (!need_dx) return;
      const std::vector<S> gm = repeated<S>(gmean, len), sl = repeated<S>(slope, len), ws = repeated<S>(wv, len);
      T* dp = dx.data_ptr<T>();
      each<V, S>(n, len, [&](int64_t i, int64_t k, auto t) {
        using W = decltype(t);
        const W xv = load<W>(xp + i), g = grad_at(i, k, xv);
        store(dp + i, (g - load<W>(&gm[k]) - (xv - load<W>(&aff.mean[k])) * load<W>(&sl[k])) * load<W>(&ws[k]));
      });
    });
  });
  return {dx, dgamma, dbeta};
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
