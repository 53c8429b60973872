// The FP8 quantisation contract of fused_act/reference.py quantize_fp8, one definition for the
// CUDA kernel (quant.cu: y never written) and the CPU quantiser (cpu.cpp: fp32 y already
// written), so that both run the very encoder and scale rules: host and device functions (FA_HD),
// integer code wherever a float operation could round differently.
#pragma once

#include <stdint.h>
#include <string.h>

#include "activations.cuh"

namespace fused_act {

// fused_act.h fa_act_quant's and fa_quantize's selectors (fused_act/_cuda.py and
// triton_kernels/quant.py use the same numbers)
enum QuantScaling { Q_TENSOR = 0, Q_ROW = 1, Q_BLOCK = 2, Q_AMAX = 3 };
enum Fp8Format { E4M3 = 0, E5M2 = 1 };

// Each format's mantissa bits, exponent bias, largest finite value (and its fp32 bits) and
// floor(log2(FMAX)), the MX rule's emax.
template <int FP8>
struct Fp8;
template <>
struct Fp8<E4M3> {
  static constexpr int MANT = 3, BIAS = 7, EMAX = 8;
  static constexpr uint32_t FMAX_BITS = 0x43E00000u;
  static constexpr float FMAX = 448.0f;
};
template <>
struct Fp8<E5M2> {
  static constexpr int MANT = 2, BIAS = 15, EMAX = 15;
  static constexpr uint32_t FMAX_BITS = 0x47600000u;
  static constexpr float FMAX = 57344.0f;
};

constexpr uint8_t FP8_NAN = 0x7F;   // reference.FP8_NAN: one code for every NaN
constexpr uint8_t E8M0_NAN = 0xFF;  // reference.E8M0_NAN
constexpr float AMAX_FLOOR = 1e-12f;

// memcpy, not a union or __float_as_uint: defined on host and device alike, and free on both
FA_HD uint32_t bits_of(float v) {
  uint32_t b;
  memcpy(&b, &v, sizeof(b));
  return b;
}
FA_HD float float_of(uint32_t b) {
  float v;
  memcpy(&v, &b, sizeof(v));
  return v;
}

// The FP8 code of v: saturated to +-FMAX, rounded to nearest even, subnormals included, the sign
// kept (-0 -> 0x80), every NaN FP8_NAN (reference._to_fp8; triton_kernels/quant.py fp8_bits).
template <int FP8>
FA_HD uint8_t fp8_code(float v) {
  using F = Fp8<FP8>;
  constexpr int SHIFT = 23 - F::MANT;
  const uint32_t bits = bits_of(v);
  const uint32_t mag = bits & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return FP8_NAN;
  // saturating first equals rounding then saturating: FMAX is a code, and no magnitude at or
  // below it rounds past it; integer order is float order here, inf included
  const uint32_t a = mag < F::FMAX_BITS ? mag : F::FMAX_BITS;
  uint32_t code;
  if (a >= (uint32_t(128 - F::BIAS) << 23)) {
    // rebias the exponent, round the dropped bits to nearest even (half an ulp less one, plus
    // the kept lowest bit); a carry steps the exponent, as it should
    code = ((a + ((1u << (SHIFT - 1)) - 1) + ((a >> SHIFT) & 1)) >> SHIFT) -
           (uint32_t(127 - F::BIAS) << F::MANT);
  } else {
    // below the least normal: the value in units of the least subnormal 2^(1 - BIAS - MANT),
    // rounded to nearest even; fp32 subnormals have exponent 1 without the implicit bit, and a
    // shift of 31 takes every significand (< 2^24) to 0, as rounding does
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7FFFFFu) | (e > 0 ? 0x800000u : 0u);
    const uint32_t ue = e > 1 ? e : 1u;
    const uint32_t want = uint32_t(151 - F::BIAS - F::MANT) - ue;
    const uint32_t sh = want < 31 ? want : 31u;
    code = (m + ((1u << (sh - 1)) - 1) + ((m >> sh) & 1)) >> sh;
  }
  return uint8_t(code | ((bits >> 24) & 0x80u));
}

// IEEE division whatever the build's flags (fast math makes a device `/` an approximation; the
// host builds have no fast math)
FA_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

FA_HD int imax(int a, int b) { return a > b ? a : b; }

// |y| as int bits: ordered as the floats, every NaN above inf
FA_HD int abs_bits(float y) { return int(bits_of(y) & 0x7FFFFFFFu); }

// max(amax, AMAX_FLOOR) / FMAX by one IEEE division (a NaN amax stays NaN: no fmaxf to drop it)
template <int FP8>
FA_HD float row_scale(int amax_bits) {
  const float amax = float_of(uint32_t(amax_bits));
  return div_rn(amax < AMAX_FLOOR ? AMAX_FLOOR : amax, Fp8<FP8>::FMAX);
}

// reference._e8m0_exponent: the MX FLOOR rule on the exponent field of a group's amax (fp32
// bits): its E8M0 byte, E8M0_NAN where the group is poisoned (amax inf or NaN), and in `mult`
// 2^-e built from its exponent field, a normal fp32, so y * mult is exact
template <int FP8>
FA_HD uint8_t mx_byte(int amax_bits, float& mult) {
  const int biased = amax_bits >> 23;
  const int e = biased - Fp8<FP8>::EMAX;
  const int byte = e < 0 ? 0 : e > 254 ? 254 : e;
  mult = float_of(uint32_t(254 - byte) << 23);
  return biased == 0xFF ? E8M0_NAN : uint8_t(byte);
}

// The code of y in a group of byte `byte` and multiplier `mult` (mx_byte): a poisoned group's
// values all FP8_NAN
template <int FP8>
FA_HD uint8_t mx_code(float y, uint8_t byte, float mult) {
  return fp8_code<FP8>(byte == E8M0_NAN ? float_of(0x7FC00000u) : y * mult);
}

}  // namespace fused_act
