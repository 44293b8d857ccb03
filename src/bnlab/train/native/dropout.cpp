// Dropout whose mask is a pure function of (seed, position): element i of the tensor's memory is kept
// when the top 32 bits of SplitMix64's finaliser of seed + (i + 1) * golden are >= p * 2^32.
//
// Why: drawing a float per element from torch's CPU generator (mt19937, one value at a time) took ~4 ms
// of a 60 ms CNN step, and the mask had to be stored for the backward pass. Here the forward pass draws
// nothing from the generator but the seed (bnlab/train/fused.py takes one per layer per step from the
// run's noise generator, so runs stay reproducible and resumable), the hash runs in vector registers,
// and the backward pass recomputes the mask instead of reading it.
// Kept values are scaled by 1 / (1 - p) in the maths type (float for bfloat16: no rounding of the scale); a dropped NaN stays
// NaN (x * 0), as torch's dropout multiplies by its mask.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "lanes.h"

namespace bnlab {
namespace {

template <typename U> inline U mix(U z) {  // SplitMix64's output function (Steele, Lea, Flood 2014)
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

typedef uint64_t U64x8 __attribute__((vector_size(64)));
typedef int32_t I32x8 __attribute__((vector_size(32)));

// in * (kept ? scale : 0), eight values at a time (eight 64-bit hashes fill one vector register)
template <typename T> void masked(const T* in, T* out, int64_t n, uint64_t seed, uint64_t threshold, double scale) {
  using S = typename MathOf<T>::type;
  using V = Vec<S, 8 * sizeof(S)>;
  const S kept = S(scale);
  at::parallel_for(0, n / 8, 4096, [&](int64_t b0, int64_t b1) {
    const U64x8 lane = {1, 2, 3, 4, 5, 6, 7, 8};
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i = 8 * b;
      const U64x8 z = mix(seed + (lane + uint64_t(i)) * 0x9e3779b97f4a7c15ull);
      const auto keep = (z >> 32) >= threshold;  // 64-bit lanes of -1 / 0
      V k;
      if constexpr (sizeof(S) == 4) k = __builtin_convertvector(keep, I32x8) ? V{} + kept : V{};
      else k = keep ? V{} + kept : V{};
      store(out + i, load<V>(in + i) * k);
    }
  });
  for (int64_t i = n / 8 * 8; i < n; ++i) {
    const uint64_t u = mix(seed + uint64_t(i + 1) * 0x9e3779b97f4a7c15ull) >> 32;
    store(out + i, load<S>(in + i) * (u >= threshold ? kept : S(0)));
  }
}

// x * mask / (1 - p) (forward), or the same of the incoming gradient (backward: the same call)
at::Tensor hashed_dropout(at::Tensor x, double p, int64_t seed) {
  TORCH_CHECK(p >= 0 && p <= 1, "dropout rate must be in [0, 1] (got ", p, ")");
  TORCH_CHECK(x.device().is_cpu(), "the native dropout runs on the CPU (got ", x.device(), ")");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "the native dropout needs a dense tensor (strides ", x.strides(), ")");
  at::Tensor out = at::empty_like(x);  // same strides: position i of x's memory is position i of out's
  const uint64_t threshold = static_cast<uint64_t>(std::ceil(p * 4294967296.0));
  const double scale = p < 1 ? 1.0 / (1.0 - p) : 0.0;
  with_storage(x, "the native dropout", "the input", [&](auto tag) {
    using T = decltype(tag);
    masked(x.data_ptr<T>(), out.data_ptr<T>(), x.numel(), static_cast<uint64_t>(seed), threshold, scale);
  });
  return out;
}

}  // namespace
}  // namespace bnlab

TORCH_LIBRARY_FRAGMENT(bnlab_native, m) {
  m.def("hashed_dropout", &bnlab::hashed_dropout);
}
