// Whole vectors of lanes for the BN kernels (bn_act.cpp), as GCC / Clang vector types: the compiler
// lowers them to the widest registers -march=native offers (AVX-512, AVX2, NEON...), where plain loops
// over a row of a few dozen channels are vectorised across rows or not at all.
//
// load / store move a value or a pack to and from the storage type T (float, double, bfloat16); (not the
// CPU's own vcvtneps2bf16: it flushes subnormals to zero, which c10 and ATen keep); a bfloat16 is the top half of a float, stored rounded to nearest
// even with NaN kept a NaN (c10's rounding).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "activations.h"

namespace bnlab {

// Vec<S, B>: B bytes of S. Wide packs (64 bytes: 16 floats) do the bulk of a row's channels; 32- and
// 16-byte packs the rest, so only the last channel or three of a row run one at a time.
// (Explicit typedefs: GCC drops vector_size from the dependent type of an alias template.)
#define BNLAB_PACKS(B)                                                              \
  typedef float F##B __attribute__((vector_size(B)));                              \
  typedef double D##B __attribute__((vector_size(B)));                             \
  typedef uint16_t H##B __attribute__((vector_size(B / 2)));                       \
  typedef uint32_t W##B __attribute__((vector_size(B)));                           \
  template <> struct VecOf<float, B> { using type = F##B; using half = H##B; using word = W##B; }; \
  template <> struct VecOf<double, B> { using type = D##B; };                       \
  template <> struct LaneOf<F##B> { using type = float; };                         \
  template <> struct LaneOf<D##B> { using type = double; };
template <typename S, int B> struct VecOf;
BNLAB_PACKS(64)
BNLAB_PACKS(32)
BNLAB_PACKS(16)
#undef BNLAB_PACKS
template <typename S, int B> using Vec = typename VecOf<S, B>::type;
template <typename S, int B> constexpr int lanes = B / sizeof(S);

// the type the maths runs in for storage type T: float for bfloat16 (as ATen's opmath), else T
template <typename T> struct MathOf { using type = T; };
template <> struct MathOf<c10::BFloat16> { using type = float; };

inline float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// one value (V = S) or one pack (V = Pack<S>) of storage type T at p
template <typename V, typename T> inline V load(const T* p) {
  if constexpr (std::is_same_v<V, T>) {
    return *p;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if constexpr (std::is_same_v<V, float>) {
      return bf16_to_float(reinterpret_cast<const uint16_t*>(p)[0]);
    } else {
      using Half = typename VecOf<float, sizeof(V)>::half;
      using Word = typename VecOf<float, sizeof(V)>::word;
      Half h;
      std::memcpy(&h, p, sizeof(h));
      Word u = __builtin_convertvector(h, Word) << 16;
      V v;
      std::memcpy(&v, &u, sizeof(v));
      return v;
    }
  } else {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
}

template <typename V, typename T> inline void store(T* p, V v) {
  if constexpr (std::is_same_v<V, T>) {
    *p = v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if constexpr (std::is_same_v<V, float>) {
      reinterpret_cast<uint16_t*>(p)[0] = float_to_bf16(v);
    } else {
      using Half = typename VecOf<float, sizeof(V)>::half;
      using Word = typename VecOf<float, sizeof(V)>::word;
      Word u;
      std::memcpy(&u, &v, sizeof(u));
      Word r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
      r = (u & 0x7fffffffu) > 0x7f800000u ? Word{} + 0x7fc0u : r;
      Half h = __builtin_convertvector(r, Half);
      std::memcpy(p, &h, sizeof(h));
    }
  } else {
    std::memcpy(p, &v, sizeof(v));
  }
}

// f(T{}) for the storage type T of t; the kernels take bfloat16, float32 and float64, anything else is
// refused naming `kernel` and `what` (e.g. "the native max-pool", "the input")
template <typename F> auto with_storage(const at::Tensor& t, const char* kernel, const char* what, F&& f) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kBFloat16 || s == at::kFloat || s == at::kDouble, kernel,
              " takes bfloat16, float32 or float64 (", what, " is ", s, ")");
  if (s == at::kBFloat16) return f(c10::BFloat16{});
  if (s == at::kFloat) return f(float{});
  return f(double{});
}

}  // namespace bnlab
