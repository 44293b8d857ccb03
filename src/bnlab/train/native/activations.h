// The activations of the native steps, forward and backward, in one place (C++'s only table; Python's is
// bnlab/nn/activations.py, whose `native` codes follow `enum Act` — tests/test_activations.py checks both).
//
// Each formula is written once for a scalar (float, double) or a GCC vector of them (lanes.h): the
// arithmetic, comparisons and `?:` read the same for both; exp and tanh go lane by lane (`lanewise`).
// NaN passes through every activation (z < 0 is false for NaN), as in ATen.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <c10/util/Exception.h>

namespace bnlab {

enum Act : int64_t { RELU = 0, SIGMOID, TANH, LEAKY_RELU, ELU, SELU, IDENTITY };
constexpr double SELU_ALPHA = 1.6732632423543772, SELU_SCALE = 1.0507009873554805;

template <typename V> struct LaneOf { using type = V; };  // the scalar type of V (specialised in lanes.h)

// how many values V holds: 1 for a scalar
template <typename V> constexpr int lane_count() { return int(sizeof(V) / sizeof(typename LaneOf<V>::type)); }

// f applied to each lane of v (v itself for a scalar)
template <typename V, typename F> inline V lanewise(V v, F f) {
  if constexpr (std::is_arithmetic_v<V>) {
    return f(v);
  } else {
    for (int i = 0; i < lane_count<V>(); ++i) v[i] = f(v[i]);
    return v;
  }
}

// the activation's output at its input z (p: the negative slope or alpha)
template <Act A, typename V, typename S = typename LaneOf<V>::type> inline V act(V z, S p) {
  if constexpr (A == RELU) return z < S(0) ? V{} : z;
  else if constexpr (A == SIGMOID) return lanewise(z, [](S v) { return S(1) / (S(1) + std::exp(-v)); });
  else if constexpr (A == TANH) return lanewise(z, [](S v) { return std::tanh(v); });
  else if constexpr (A == LEAKY_RELU) return z > S(0) ? z : z * p;
  else if constexpr (A == ELU) return z > S(0) ? z : lanewise(z, [](S v) { return std::expm1(v); }) * p;
  else if constexpr (A == SELU)
    return (z > S(0) ? z : lanewise(z, [](S v) { return std::expm1(v); }) * S(SELU_ALPHA)) * S(SELU_SCALE);
  else return z;
}

// the gradient g at the output carried back to the input, from the input z and output y: the formulas
// of ATen's backward kernels (ReLU and LeakyReLU read the input, the others the output; a ReLU passes
// nothing where z <= 0, even an infinite g)
template <Act A, typename V, typename S = typename LaneOf<V>::type> inline V act_backward(V g, V z, V y, S p) {
  if constexpr (A == RELU) return z <= S(0) ? V{} : g;
  else if constexpr (A == SIGMOID) return g * (S(1) - y) * y;
  else if constexpr (A == TANH) return g * (S(1) - y * y);
  else if constexpr (A == LEAKY_RELU) return z > S(0) ? g : g * p;
  else if constexpr (A == ELU) return y <= S(0) ? g * (y + p) : g;
  else if constexpr (A == SELU) return y <= S(0) ? g * (y + S(SELU_ALPHA * SELU_SCALE)) : g * S(SELU_SCALE);
  else return g;
}

// f(std::integral_constant<Act, a>{}): the activation as a compile-time constant, so each loop is
// compiled (and vectorised) for one activation
template <typename F> inline void with_act(int64_t a, F&& f) {
  switch (a) {
    case RELU: f(std::integral_constant<Act, RELU>{}); break;
    case SIGMOID: f(std::integral_constant<Act, SIGMOID>{}); break;
    case TANH: f(std::integral_constant<Act, TANH>{}); break;
    case LEAKY_RELU: f(std::integral_constant<Act, LEAKY_RELU>{}); break;
    case ELU: f(std::integral_constant<Act, ELU>{}); break;
    case SELU: f(std::integral_constant<Act, SELU>{}); break;
    case IDENTITY: f(std::integral_constant<Act, IDENTITY>{}); break;
    default: TORCH_CHECK(false, "unknown activation code ", a);
  }
}

}  // namespace bnlab
