// Batch normalisation fused with the activation after it, on raw (rows, C) memory: the one BN
// implementation in C++, used by the fused CNN step's kernels (bn_act.cpp: tensors in, tensors out) and by
// the native MLP step (mlp_step.cpp: its own buffers). Channels are the fastest axis: (N, C) rows or
// channels_last feature maps.
//
// Maths (the same as bnlab.nn.BatchNorm and ATen's kernels): biased batch variance, eps inside the
// root, y = act((x - mean) * invstd * gamma + beta), and the usual input gradient
// dx = (g - mean(g) - (x - mean) * invstd^2 * mean(g * (x - mean))) * invstd * gamma, g = dy * act'(z),
// with z recomputed from x (nothing saved but x).
// The statistics are sums of x - ref (ref: the mean of the first rows; one pass, no cancellation when
// |mean| >> std) accumulated in the maths type over 64 periods, then in double; the variance is returned
// as computed (not rebuilt from invstd, which loses it when var << eps).
// bfloat16 inputs run their maths in float with float statistics, as ATen's mixed-type kernels.
// Each pass sums a block of rows' channels in vector registers (lanes.h), so it runs at memory speed.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <utility>
#include <vector>

#include "activations.h"
#include "lanes.h"

namespace bnlab {

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
  const int64_t c = int64_t(v.size());  // len is a whole number of c (no modulo: ~30 cycles a value)
  for (int64_t k = 0; k < len; k += c)
    for (int64_t j = 0; j < c; ++j) out[k + j] = S(v[j]);
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
    for (int64_t k = 0; k < len; k += c)
      for (int64_t j = 0; j < c; ++j) {
        total[j] += part[t * 2 * len + k + j];
        total[c + j] += part[t * 2 * len + len + k + j];
      }
  for (int64_t i = periods * len, j = 0; i < n; ++i, j = j + 1 == c ? 0 : j + 1) {  // the last partial
    std::pair<S, S> t = term(i, i - periods * len, S{});                             // period: whole rows
    total[j] += t.first;
    total[c + j] += t.second;
  }
  return total;
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

// each channel's batch mean and biased variance of the n values of x (n / c rows of c channels), in double
template <typename T> void batch_stats(const T* x, int64_t n, int64_t c, double* mean, double* var) {
  using S = typename MathOf<T>::type;
  const int64_t rows = n / c;
  with_width<S>(c, [&](auto tag, int64_t len) {
    using V = decltype(tag);
    // shifted by the mean of the first rows (at most REF_ROWS), so the sums stay small even when one
    // row is far from the others (a float sum of x - x[0] lost 1e-4 of the variance to an outlying x[0])
    std::vector<double> first(c, 0.0);
    const int64_t head = std::min(rows, REF_ROWS);
    for (int64_t r = 0; r < head; ++r)
      for (int64_t j = 0; j < c; ++j) first[j] += double(load<S>(x + r * c + j));
    for (int64_t j = 0; j < c; ++j) first[j] = double(S(first[j] / head));  // in S: d = x - ref exactly as summed
    const std::vector<S> ref = repeated<S>(first, len);
    std::vector<double> s = sums<V, S>(n, c, len, [&](int64_t i, int64_t k, auto t) {
      using W = decltype(t);
      const W d = load<W>(x + i) - load<W>(&ref[k]);
      return std::pair<W, W>(d, d * d);
    });
    for (int64_t j = 0; j < c; ++j) {
      const double m1 = s[j] / rows;
      mean[j] = first[j] + m1;
      var[j] = std::max(s[c + j] / rows - m1 * m1, 0.0);
    }
  });
}

// y = act(z), z = (x - mean) * invstd * gamma + beta, for activation code a with parameter p; the
// constants are c doubles each (the statistics as their stored tensors hold them)
template <typename T>
void normalize(const T* x, T* y, int64_t n, int64_t c, const std::vector<double>& mean,
               const std::vector<double>& invstd, const std::vector<double>& gamma, const std::vector<double>& beta,
               int64_t a, double p) {
  using S = typename MathOf<T>::type;
  with_width<S>(c, [&](auto tag, int64_t len) {
    using V = decltype(tag);
    const Affine<S> aff(mean, invstd, gamma, beta, len);
    with_act(a, [&](auto A) {
      each<V, S>(n, len, [&](int64_t i, int64_t k, auto t) {
        using W = decltype(t);
        store(y + i, act<decltype(A)::value>(aff.z(load<W>(x + i), k), S(p)));
      });
    });
  });
}

// normalize's gradients from dy at its output: dgamma and dbeta (c doubles each) and, where dx is not
// null, dx
template <typename T>
void normalize_backward(const T* dy, const T* x, T* dx, int64_t n, int64_t c, const std::vector<double>& mean,
                        const std::vector<double>& inv, const std::vector<double>& gamma,
                        const std::vector<double>& beta, int64_t a, double p, double* dgamma, double* dbeta) {
  using S = typename MathOf<T>::type;
  const int64_t rows = n / c;
  with_width<S>(c, [&](auto tag, int64_t len) {
    using V = decltype(tag);
    const Affine<S> aff(mean, inv, gamma, beta, len);
    with_act(a, [&](auto A) {
      constexpr Act K = decltype(A)::value;
      // the gradient reaching the normalised value z, through the activation (z recomputed from x)
      auto grad_at = [&](int64_t i, int64_t k, auto xv) {
        using W = decltype(xv);
        const W z = aff.z(xv, k);
        return act_backward<K>(load<W>(dy + i), z, act<K>(z, S(p)), S(p));
      };
      std::vector<double> s = sums<V, S>(n, c, len, [&](int64_t i, int64_t k, auto t) {
        using W = decltype(t);
        const W xv = load<W>(x + i), g = grad_at(i, k, xv);
        return std::pair<W, W>(g, g * (xv - load<W>(&aff.mean[k])));
      });
      std::vector<double> gmean(c), slope(c), wv(c);
      for (int64_t j = 0; j < c; ++j) {
        dgamma[j] = s[c + j] * inv[j], dbeta[j] = s[j];
        gmean[j] = s[j] / rows, slope[j] = s[c + j] * inv[j] * inv[j] / rows, wv[j] = inv[j] * gamma[j];
      }
      if (!dx) return;
      const std::vector<S> gm = repeated<S>(gmean, len), sl = repeated<S>(slope, len), ws = repeated<S>(wv, len);
      each<V, S>(n, len, [&](int64_t i, int64_t k, auto t) {
        using W = decltype(t);
        const W xv = load<W>(x + i), g = grad_at(i, k, xv);
        store(dx + i, (g - load<W>(&gm[k]) - (xv - load<W>(&aff.mean[k])) * load<W>(&sl[k])) * load<W>(&ws[k]));
      });
    });
  });
}

}  // namespace bnlab
