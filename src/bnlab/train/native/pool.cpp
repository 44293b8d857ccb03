// Max-pooling over non-overlapping k x k windows (stride k, no padding or dilation, floor mode) on
// channels_last maps, forward and backward.
//
// Why: ATen's channels_last max-pool took ~8 ms of a 50 ms bf16 CNN step: the forward writes an int64
// index per output, the backward zero-fills the input gradient and then scatters into it. Here the
// forward keeps each maximum's window position in the map's own type (exact: at most 225 positions),
// and the backward writes every input gradient once (dy at the maximum's position, 0 elsewhere).
// ATen's rule decides: a value replaces the maximum when larger or NaN, in the window's row-major order
// (so the first of equal maxima wins). Other max-pool settings stay with ATen (bnlab/train/fused.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "lanes.h"

namespace bnlab {
namespace {

// f(q, V{}) for each chunk of a row's c channels: 64-byte packs, then a 32- and a 16-byte one, then singly
template <typename S, typename F> inline void over_channels(int64_t c, F&& f) {
  int64_t q = 0;
  for (; q + lanes<S, 64> <= c; q += lanes<S, 64>) f(q, Vec<S, 64>{});
  if (q + lanes<S, 32> <= c) f(q, Vec<S, 32>{}), q += lanes<S, 32>;
  if (q + lanes<S, 16> <= c) f(q, Vec<S, 16>{}), q += lanes<S, 16>;
  for (; q < c; ++q) f(q, S{});
}

template <typename T> void forward(const at::Tensor& x, at::Tensor& y, at::Tensor& where, int64_t k) {
  using S = typename MathOf<T>::type;
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), ho = y.size(2), wo = y.size(3);
  const T* xp = x.data_ptr<T>();
  T *yp = y.data_ptr<T>(), *ip = where.data_ptr<T>();
  at::parallel_for(0, n * ho, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / ho, i = r % ho;
      for (int64_t j = 0; j < wo; ++j) {
        const T* corner = xp + ((b * h + i * k) * w + j * k) * c;
        const int64_t o = ((b * ho + i) * wo + j) * c;
        over_channels<S>(c, [&](int64_t q, auto tag) {
          using V = decltype(tag);
          V best = load<V>(corner + q), at = V{};
          for (int64_t pos = 1; pos < k * k; ++pos) {
            const V v = load<V>(corner + ((pos / k) * w + pos % k) * c + q);
            const auto take = (v > best) | (v != v);
            best = take ? v : best;
            at = take ? V{} + S(pos) : at;
          }
          store(yp + o + q, best);
          store(ip + o + q, at);
        });
      }
    }
  });
}

template <typename T> void backward(const at::Tensor& dy, const at::Tensor& where, at::Tensor& dx, int64_t k) {
  using S = typename MathOf<T>::type;
  const int64_t n = dx.size(0), c = dx.size(1), h = dx.size(2), w = dx.size(3), ho = dy.size(2), wo = dy.size(3);
  const T *gp = dy.data_ptr<T>(), *ip = where.data_ptr<T>();
  T* dp = dx.data_ptr<T>();
  at::parallel_for(0, n * h, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {  // one input row: each value its window's gradient or 0
      const int64_t b = r / h, yy = r % h, i = yy / k;
      for (int64_t xx = 0; xx < w; ++xx) {
        T* out = dp + (r * w + xx) * c;
        const int64_t j = xx / k;
        const bool covered = i < ho && j < wo;  // rows and columns past the last window get 0
        const int64_t o = ((b * ho + i) * wo + j) * c;
        const S pos = S((yy % k) * k + xx % k);
        over_channels<S>(c, [&](int64_t q, auto tag) {
          using V = decltype(tag);
          store(out + q, covered ? (load<V>(ip + o + q) == pos ? load<V>(gp + o + q) : V{}) : V{});
        });
      }
    }
  });
}

void check_maps(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "the native max-pool needs a CPU (N, C, H, W) channels_last tensor (", what, ": ", x.sizes(),
              ", strides ", x.strides(), ", ", x.device(), ")");
}

// y, and the position (0 .. k*k - 1, row-major in the window) of each output's maximum in y's type
std::vector<at::Tensor> max_pool_forward(at::Tensor x, int64_t k) {
  check_maps(x, "the input");
  TORCH_CHECK(k >= 1 && k <= 15, "the native max-pool takes windows of 1 to 15 (got ", k, ")");
  TORCH_CHECK(x.size(2) >= k && x.size(3) >= k, "a ", k, "x", k, " window does not fit a ", x.size(2), "x",
              x.size(3), " map");
  at::Tensor y = at::empty({x.size(0), x.size(1), x.size(2) / k, x.size(3) / k},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor where = at::empty_like(y);
  with_storage(x, "the native max-pool", "the input", [&](auto tag) { forward<decltype(tag)>(x, y, where, k); });
  return {y, where};
}

// the input's gradient (input sizes `sizes`): dy at each window's maximum, 0 elsewhere
at::Tensor max_pool_backward(at::Tensor dy, at::Tensor where, std::vector<int64_t> sizes, int64_t k) {
  check_maps(dy, "the gradient");
  check_maps(where, "the positions");  // both channels_last: the same memory order (whatever size-1 strides say)
  TORCH_CHECK(k >= 1 && k <= 15, "the native max-pool takes windows of 1 to 15 (got ", k, ")");
  TORCH_CHECK(where.sizes() == dy.sizes() && where.scalar_type() == dy.scalar_type(),
              "the positions must match the gradient (", where.scalar_type(), " ", where.sizes(), " vs ",
              dy.scalar_type(), " ", dy.sizes(), ")");
  TORCH_CHECK(sizes.size() == 4 && sizes[0] == dy.size(0) && sizes[1] == dy.size(1) && sizes[2] / k == dy.size(2) &&
                  sizes[3] / k == dy.size(3),
              "input sizes ", at::IntArrayRef(sizes), " do not pool to ", dy.sizes(), " with ", k, "x", k, " windows");
  at::Tensor dx = at::empty(sizes, dy.options().memory_format(at::MemoryFormat::ChannelsLast));
  with_storage(dy, "the native max-pool", "the gradient", [&](auto tag) { backward<decltype(tag)>(dy, where, dx, k); });
  return dx;
}

}  // namespace
}  // namespace bnlab

TORCH_LIBRARY_FRAGMENT(bnlab_native, m) {
  m.def("max_pool_forward", &bnlab::max_pool_forward);
  m.def("max_pool_backward", &bnlab::max_pool_backward);
}
