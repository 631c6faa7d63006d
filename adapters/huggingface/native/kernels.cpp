// Kernels of our own for CPUs with AVX-512 VNNI or with AVX2, FMA and F16C, built at run time by
// adapters/huggingface/native/__init__.py (once for the CPU's kind) and registered as torch.ops.hf_openai_server.*:
//
// - int8_linear: each input row quantized to 8 bits with a scale of its own, multiplied against int8 weights packed
//   in panels of 16 output rows (`vpdpbusd`; with AVX2, `vpmaddubsw` on the inputs' magnitudes and the weights with
//   the inputs' signs), scaled back to float32;
// - int4_linear: 4-bit weights in q4_1's groups of 32, inputs quantized per group of 32;
// - float_linear: float32 weights in panels of 16 output rows, fused multiply-adds in input order;
// - rms_norm: a Llama-style RMS norm of each row, in one pass where torch takes eight ops; silu;
// - one_query_attention: each new query position's attention as a one-token step at its place computes it, the
//   query heads of a key head reading the keys and values once;
// - attention_input, layer_output: a Llama-style layer's two halves around its attention, from the kernels above,
//   in one op each; decode_layers: both and the attention between them, for every layer of a decoding step or
//   verifying pass.
//
// Each row goes through the same instructions whatever the other rows hold or how many there are (integer sums are
// exact, the scaling is per element, a row's norm is summed by one thread), so a token gets the same numbers alone,
// in a batch or in a prompt. Floats go sixteen at a time (`V16`: one 512-bit register, or two 256-bit ones) through
// the same operations in the same order in both builds, and integer sums are exact in both: the two libraries give
// the same bits.
#include <torch/custom_class.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HF_OPENAI_SERVER_AVX512 1
#elif !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#error "kernels.cpp is built for AVX-512 VNNI or for AVX2 with FMA and F16C"
#endif

namespace {

constexpr int64_t kPanel = 16;  // output rows per packed panel: sixteen sums, one V16
constexpr int64_t kGroup = 4;   // inputs per 32-bit lane of packed int8 weights

// --- Sixteen floats (and sixteen int32) at a time --------------------------------------------------------------------

#ifdef HF_OPENAI_SERVER_AVX512
constexpr int64_t kRows = 4;          // input rows per micro-kernel
constexpr int64_t kMostPanels = 4;    // panels per int8 or float micro-kernel
constexpr int64_t kInt4Panels = 2;    // panels per int4 micro-kernel

struct V16 {
  __m512 v;
};
struct I16 {
  __m512i v;
};

inline V16 zero16() { return {_mm512_setzero_ps()}; }
inline V16 set16(float x) { return {_mm512_set1_ps(x)}; }
inline V16 load16(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store16(float* p, V16 a) { _mm512_storeu_ps(p, a.v); }
inline __mmask16 first_lanes(int64_t count) {
  return static_cast<__mmask16>(count >= 16 ? 0xFFFF : count <= 0 ? 0 : (1u << count) - 1);
}
inline V16 load16(const float* p, int64_t count) { return {_mm512_maskz_loadu_ps(first_lanes(count), p)}; }
inline void store16(float* p, V16 a, int64_t count) { _mm512_mask_storeu_ps(p, first_lanes(count), a.v); }
inline V16 operator+(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V16 operator-(V16 a, V16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V16 operator*(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V16 operator/(V16 a, V16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline V16 larger(V16 a, V16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline V16 smaller(V16 a, V16 b) { return {_mm512_min_ps(a.v, b.v)}; }
inline V16 fmadd(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V16 magnitude(V16 a) { return {_mm512_abs_ps(a.v)}; }
inline V16 nearest(V16 a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline V16 halves16(const void* p) {  // sixteen float16
  return {_mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)))};
}
inline float largest16(V16 a) { return _mm512_reduce_max_ps(a.v); }
inline __m256 low_half(V16 a) { return _mm512_castps512_ps256(a.v); }
inline __m256 high_half(V16 a) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)); }
// 2^n for whole numbers n; zero where x < limit.
inline V16 power_of_two(V16 n) {
  const __m512i exponent = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23);
  return {_mm512_castsi512_ps(exponent)};
}
inline V16 zero_below(V16 value, V16 x, float limit) {
  const __mmask16 below = _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(limit), _CMP_LT_OQ);
  return {_mm512_maskz_mov_ps(static_cast<__mmask16>(~below), value.v)};
}
inline I16 rounded16(V16 a) { return {_mm512_cvt_roundps_epi32(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline I16 plus(I16 a, int32_t b) { return {_mm512_add_epi32(a.v, _mm512_set1_epi32(b))}; }
inline int32_t total16(I16 a) { return _mm512_reduce_add_epi32(a.v); }
inline V16 to_floats(I16 a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline void store_low_bytes16(I16 a, void* out) {
  _mm_storeu_si128(static_cast<__m128i*>(out), _mm512_cvtepi32_epi8(a.v));
}
#else
constexpr int64_t kRows = 2;  // two 256-bit registers a V16: fewer rows and panels fit in the 16 registers
constexpr int64_t kMostPanels = 2;
constexpr int64_t kInt4Panels = 1;

struct V16 {
  __m256 low, high;
};
struct I16 {
  __m256i low, high;
};

inline V16 zero16() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 set16(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline V16 load16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store16(float* p, V16 a) {
  _mm256_storeu_ps(p, a.low);
  _mm256_storeu_ps(p + 8, a.high);
}
inline __m256i first_lanes(int64_t count) {  // lanes 0..count-1 of eight
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(count, 0, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V16 load16(const float* p, int64_t count) {
  return {_mm256_maskload_ps(p, first_lanes(count)), _mm256_maskload_ps(p + 8, first_lanes(count - 8))};
}
inline void store16(float* p, V16 a, int64_t count) {
  _mm256_maskstore_ps(p, first_lanes(count), a.low);
  _mm256_maskstore_ps(p + 8, first_lanes(count - 8), a.high);
}
inline V16 operator+(V16 a, V16 b) { return {_mm256_add_ps(a.low, b.low), _mm256_add_ps(a.high, b.high)}; }
inline V16 operator-(V16 a, V16 b) { return {_mm256_sub_ps(a.low, b.low), _mm256_sub_ps(a.high, b.high)}; }
inline V16 operator*(V16 a, V16 b) { return {_mm256_mul_ps(a.low, b.low), _mm256_mul_ps(a.high, b.high)}; }
inline V16 operator/(V16 a, V16 b) { return {_mm256_div_ps(a.low, b.low), _mm256_div_ps(a.high, b.high)}; }
inline V16 larger(V16 a, V16 b) { return {_mm256_max_ps(a.low, b.low), _mm256_max_ps(a.high, b.high)}; }
inline V16 smaller(V16 a, V16 b) { return {_mm256_min_ps(a.low, b.low), _mm256_min_ps(a.high, b.high)}; }
inline V16 fmadd(V16 a, V16 b, V16 c) {
  return {_mm256_fmadd_ps(a.low, b.low, c.low), _mm256_fmadd_ps(a.high, b.high, c.high)};
}
inline V16 magnitude(V16 a) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  return {_mm256_andnot_ps(sign, a.low), _mm256_andnot_ps(sign, a.high)};
}
inline V16 nearest(V16 a) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.low, kNearest), _mm256_round_ps(a.high, kNearest)};
}
inline V16 halves16(const void* p) {
  const __m128i* halves = static_cast<const __m128i*>(p);
  return {_mm256_cvtph_ps(_mm_loadu_si128(halves)), _mm256_cvtph_ps(_mm_loadu_si128(halves + 1))};
}
inline float largest16(V16 a) {
  const __m256 eight = _mm256_max_ps(a.low, a.high);
  __m128 four = _mm_max_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  four = _mm_max_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_max_ss(four, _mm_shuffle_ps(four, four, 1)));
}
inline __m256 low_half(V16 a) { return a.low; }
inline __m256 high_half(V16 a) { return a.high; }
inline V16 power_of_two(V16 n) {
  const __m256i bias = _mm256_set1_epi32(127);
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.low), bias), 23)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.high), bias), 23))};
}
inline V16 zero_below(V16 value, V16 x, float limit) {
  const __m256 bound = _mm256_set1_ps(limit);
  return {_mm256_andnot_ps(_mm256_cmp_ps(x.low, bound, _CMP_LT_OQ), value.low),
          _mm256_andnot_ps(_mm256_cmp_ps(x.high, bound, _CMP_LT_OQ), value.high)};
}
inline I16 rounded16(V16 a) {  // to nearest, ties to even: the rounding mode every thread starts with
  return {_mm256_cvtps_epi32(a.low), _mm256_cvtps_epi32(a.high)};
}
inline I16 plus(I16 a, int32_t b) {
  const __m256i added = _mm256_set1_epi32(b);
  return {_mm256_add_epi32(a.low, added), _mm256_add_epi32(a.high, added)};
}
inline int32_t total16(I16 a) {
  const __m256i eight = _mm256_add_epi32(a.low, a.high);
  __m128i four = _mm_add_epi32(_mm256_castsi256_si128(eight), _mm256_extracti128_si256(eight, 1));
  four = _mm_add_epi32(four, _mm_shuffle_epi32(four, _MM_SHUFFLE(1, 0, 3, 2)));
  four = _mm_add_epi32(four, _mm_shuffle_epi32(four, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(four);
}
inline V16 to_floats(I16 a) { return {_mm256_cvtepi32_ps(a.low), _mm256_cvtepi32_ps(a.high)}; }
inline void store_low_bytes16(I16 a, void* out) {  // each lane's low byte, as _mm512_cvtepi32_epi8 keeps it
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1,
                                        -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i gather = _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0);
  const __m256i low = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(a.low, pick), gather);
  const __m256i high = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(a.high, pick), gather);
  _mm_storeu_si128(static_cast<__m128i*>(out),
                   _mm_unpacklo_epi64(_mm256_castsi256_si128(low), _mm256_castsi256_si128(high)));
}
#endif

// The sixteen lanes added up as GCC's _mm512_reduce_add_ps adds them: the two halves, their two quarters, then
// lanes 0 + 2 and 1 + 3, then those two. Both builds use this order.
inline float sum16(V16 a) {
  const __m256 eight = _mm256_add_ps(high_half(a), low_half(a));
  const __m128 four = _mm_add_ps(_mm256_extractf128_ps(eight, 1), _mm256_castps256_ps128(eight));
  const __m128 two = _mm_add_ps(four, _mm_shuffle_ps(four, four, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(two) + _mm_cvtss_f32(_mm_shuffle_ps(two, two, 1));
}

// e^x for sixteen floats: x = n ln 2 + r, 2^n from the exponent bits, e^r by a degree-6 polynomial (about 2 ulp);
// 0 below -87 (a masked column's -infinity included).
V16 exp16(V16 x) {
  const V16 clamped = smaller(larger(x, set16(-87.0f)), set16(88.0f));
  const V16 n = nearest(clamped * set16(1.44269504088896341f));
  V16 r = clamped - n * set16(0.693359375f);
  r = r - n * set16(-2.12194440e-4f);
  V16 p = set16(1.9875691500e-4f);
  p = p * r + set16(1.3981999507e-3f);
  p = p * r + set16(8.3334519073e-3f);
  p = p * r + set16(4.1665795894e-2f);
  p = p * r + set16(1.6666665459e-1f);
  p = p * r + set16(5.0000001201e-1f);
  p = p * r * r + (r + set16(1.0f));
  return zero_below(p * power_of_two(n), x, -87.0f);
}

// Four consecutive input codes as one 32-bit lane, what a broadcast repeats against a group of packed weights.
inline int32_t four_codes(const void* codes) {
  int32_t four;
  std::memcpy(&four, codes, sizeof(four));
  return four;
}

// One row's sums of one panel into its outputs `start` to `start + 16` (those below `n`), the bias (if any) added.
inline void store_panel(V16 sums, const float* bias, int64_t start, int64_t n, float* out) {
  const int64_t count = std::min(kPanel, n - start);
  store16(out + start, bias ? sums + load16(bias + start, count) : sums, count);
}

// Each input row to unsigned 8 bits: round(x * 127 / max|x|) + 128 (to nearest, ties to even), and its scale
// max|x| / 127. Sixteen inputs at a time, the rest one by one: both round the same product the same way.
void quantize_rows(const float* x, int64_t rows, int64_t k, int64_t padded, uint8_t* codes, float* scales) {
  const int64_t vectorised = k - k % 16;
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * k;
    V16 largest_lanes = zero16();
    for (int64_t i = 0; i < vectorised; i += 16) largest_lanes = larger(largest_lanes, magnitude(load16(row + i)));
    float largest = largest16(largest_lanes);
    for (int64_t i = vectorised; i < k; ++i) largest = std::max(largest, std::fabs(row[i]));
    const float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
    scales[r] = largest / 127.0f;
    uint8_t* out = codes + r * padded;
    const V16 times = set16(inverse);
    for (int64_t i = 0; i < vectorised; i += 16)
      store_low_bytes16(plus(rounded16(load16(row + i) * times), 128), out + i);
    for (int64_t i = vectorised; i < k; ++i)
      out[i] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(row[i] * inverse)) + 128);
    for (int64_t i = k; i < padded; ++i) out[i] = 128;
  }
}

// `rows` (1..kRows) input rows against `panels` (1..kMostPanels) consecutive panels: rows x panels sums in registers,
// each loaded weight multiplied with every row. Each sum is the exact integer sum of the inputs' signed codes
// (code - 128) times the weights, then scaled by the row's and the weight row's scales.
template <int rows, int panels>
void micro_kernel(const uint8_t* codes, int64_t padded, const float* row_scales, const int8_t* weights,
                  const int32_t* sums, const float* scales, const float* bias, int64_t n0, int64_t n,
                  float* out) {
  const int64_t groups = padded / kGroup;
  const int64_t panel_bytes = groups * kPanel * kGroup;
#ifdef HF_OPENAI_SERVER_AVX512
  __m512i acc[rows][panels];
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < panels; ++p) acc[r][p] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i w[panels];
    for (int p = 0; p < panels; ++p) w[p] = _mm512_loadu_si512(weights + p * panel_bytes + g * kPanel * kGroup);
    for (int r = 0; r < rows; ++r) {
      const __m512i x = _mm512_set1_epi32(four_codes(codes + r * padded + g * kGroup));
      for (int p = 0; p < panels; ++p) acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], x, w[p]);
    }
  }
  I16 exact[rows][panels];  // the unsigned codes' sums, less 128 times each weight row's sum
  for (int p = 0; p < panels && n0 + p * kPanel < n; ++p) {
    const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512(sums + n0 + p * kPanel), 7);
    for (int r = 0; r < rows; ++r) exact[r][p] = {_mm512_sub_epi32(acc[r][p], offset)};
  }
#else
  // vpmaddubsw multiplies unsigned by signed bytes, in pairs added into 16 bits: the inputs' magnitudes (up to 127)
  // times the weights given the inputs' signs (up to 127 either way) add up to 32258 at most, within them.
  (void)sums;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  __m256i acc[rows][panels][2];
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < panels; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_si256();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i w[panels][2];
    for (int p = 0; p < panels; ++p)
      for (int h = 0; h < 2; ++h)
        w[p][h] = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(weights + p * panel_bytes + g * kPanel * kGroup + 32 * h));
    for (int r = 0; r < rows; ++r) {
      // the codes less 128, as signed bytes
      const __m256i x = _mm256_xor_si256(_mm256_set1_epi32(four_codes(codes + r * padded + g * kGroup)), flip);
      const __m256i size = _mm256_abs_epi8(x);
      for (int p = 0; p < panels; ++p)
        for (int h = 0; h < 2; ++h) {
          const __m256i pairs = _mm256_maddubs_epi16(size, _mm256_sign_epi8(w[p][h], x));
          acc[r][p][h] = _mm256_add_epi32(acc[r][p][h], _mm256_madd_epi16(pairs, ones));
        }
    }
  }
  I16 exact[rows][panels];
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < panels; ++p) exact[r][p] = {acc[r][p][0], acc[r][p][1]};
#endif
  for (int p = 0; p < panels; ++p) {
    const int64_t start = n0 + p * kPanel;
    if (start >= n) break;
    const V16 weight_scale = load16(scales + start);
    for (int r = 0; r < rows; ++r)
      store_panel(to_floats(exact[r][p]) * (set16(row_scales[r]) * weight_scale), bias, start, n, out + r * n);
  }
}

// Every input row against `count` panels from `panel` on: a few panels at a time (they stay in cache), every row
// against them before the next.
template <int rows>
void row_block(const uint8_t* codes, int64_t padded, const float* row_scales, const int8_t* weights,
               const int32_t* sums, const float* scales, const float* bias, int64_t panel, int64_t count, int64_t n,
               float* out) {
  const int64_t panel_bytes = padded * kPanel;
  const int8_t* w = weights + panel * panel_bytes;
  if (count == 4)
    micro_kernel<rows, 4>(codes, padded, row_scales, w, sums, scales, bias, panel * kPanel, n, out);
  else if (count == 2)
    micro_kernel<rows, 2>(codes, padded, row_scales, w, sums, scales, bias, panel * kPanel, n, out);
  else
    micro_kernel<rows, 1>(codes, padded, row_scales, w, sums, scales, bias, panel * kPanel, n, out);
}

// How many panels (of `left`) the next micro-kernel takes: kMostPanels, 2 or 1.
inline int64_t panels_next(int64_t left) { return left >= kMostPanels ? kMostPanels : left >= 2 ? 2 : 1; }

void panels_kernel(const uint8_t* codes, int64_t m, int64_t padded, const float* row_scales, const int8_t* weights,
                   const int32_t* sums, const float* scales, const float* bias, int64_t panel, int64_t end,
                   int64_t n, float* out) {
  while (panel < end) {
    const int64_t count = panels_next(end - panel);
    for (int64_t r = 0; r < m; r += kRows) {
      const uint8_t* c = codes + r * padded;
      const float* s = row_scales + r;
      float* o = out + r * n;
      switch (std::min(kRows, m - r)) {
        case 4: row_block<4>(c, padded, s, weights, sums, scales, bias, panel, count, n, o); break;
        case 3: row_block<3>(c, padded, s, weights, sums, scales, bias, panel, count, n, o); break;
        case 2: row_block<2>(c, padded, s, weights, sums, scales, bias, panel, count, n, o); break;
        default: row_block<1>(c, padded, s, weights, sums, scales, bias, panel, count, n, o); break;
      }
    }
    panel += count;
  }
}

// int4: 4-bit weight codes in groups of 32 inputs, each group of each output row with a float16 scale and minimum
// (a weight is code * scale + minimum, as GGUF's q4_1 stores it). Packed per panel of 16 output rows and group: four
// 64-byte blocks of codes, block j holding for each row its inputs 4j..4j+3 in the low nibbles and 4j+16..4j+19 in
// the high ones (what two `vpdpbusd` take, after a mask and a shift), then the 16 scales and the 16 minimums.
constexpr int64_t kInt4Group = 32;
constexpr int64_t kInt4Codes = kPanel * kInt4Group / 2;      // bytes of codes per panel and group
constexpr int64_t kInt4Block = kInt4Codes + 2 * kPanel * 2;  // and their float16 scales and minimums

// Each group of 32 inputs of each row to signed 8 bits with a scale of its own, as llama.cpp's q8_1 blocks:
// round(x * 127 / max|x|) and max|x| / 127, with the group's sum of codes times that scale.
void quantize_groups(const float* x, int64_t rows, int64_t k, int8_t* codes, float* scales, float* sums) {
  const int64_t groups = k / kInt4Group;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* group = x + r * k + g * kInt4Group;
      const V16 first = load16(group), second = load16(group + 16);
      const float largest = largest16(larger(magnitude(first), magnitude(second)));
      const float scale = largest / 127.0f;
      const V16 times = set16(largest > 0.0f ? 127.0f / largest : 0.0f);
      const I16 low = rounded16(first * times), high = rounded16(second * times);
      int8_t* out = codes + r * k + g * kInt4Group;
      store_low_bytes16(low, out);
      store_low_bytes16(high, out + 16);
      scales[r * groups + g] = scale;
      sums[r * groups + g] = static_cast<float>(total16(low) + total16(high)) * scale;
    }
  }
}

// `rows` input rows against `panels` (up to kInt4Panels) consecutive panels: per group, the integer dot of codes and
// inputs (low nibbles against the group's first 16 inputs of each block, high ones against the rest), then scaled by
// the weights' and the inputs' scales and shifted by the weights' minimum times the inputs' sum, into a float sum.
template <int rows, int panels>
void int4_micro_kernel(const int8_t* codes, int64_t k, const float* group_scales, const float* group_sums,
                       const uint8_t* weights, const float* bias, int64_t n0, int64_t n, float* out) {
  const int64_t groups = k / kInt4Group;
  const int64_t panel_bytes = groups * kInt4Block;
  V16 total[rows][panels];
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < panels; ++p) total[r][p] = zero16();
  for (int64_t g = 0; g < groups; ++g) {
    I16 dots[rows][panels];
#ifdef HF_OPENAI_SERVER_AVX512
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512i acc[rows][panels];
    for (int r = 0; r < rows; ++r)
      for (int p = 0; p < panels; ++p) acc[r][p] = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
      __m512i wl[panels], wh[panels];
      for (int p = 0; p < panels; ++p) {
        const __m512i both = _mm512_loadu_si512(weights + p * panel_bytes + g * kInt4Block + j * 64);
        wl[p] = _mm512_and_si512(both, low);
        wh[p] = _mm512_and_si512(_mm512_srli_epi16(both, 4), low);
      }
      for (int r = 0; r < rows; ++r) {
        const int8_t* group = codes + r * k + g * kInt4Group + 4 * j;
        const __m512i x1 = _mm512_set1_epi32(four_codes(group)), x2 = _mm512_set1_epi32(four_codes(group + 16));
        for (int p = 0; p < panels; ++p)
          acc[r][p] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[r][p], wl[p], x1), wh[p], x2);
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int p = 0; p < panels; ++p) dots[r][p] = {acc[r][p]};
#else
    // vpmaddubsw: codes (up to 15) times signed inputs (up to 127 either way), in pairs: 3810 at most.
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256i acc[rows][panels][2];
    for (int r = 0; r < rows; ++r)
      for (int p = 0; p < panels; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j) {
      __m256i wl[panels][2], wh[panels][2];
      for (int p = 0; p < panels; ++p)
        for (int h = 0; h < 2; ++h) {
          const __m256i both = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(weights + p * panel_bytes + g * kInt4Block + j * 64 + 32 * h));
          wl[p][h] = _mm256_and_si256(both, low);
          wh[p][h] = _mm256_and_si256(_mm256_srli_epi16(both, 4), low);
        }
      for (int r = 0; r < rows; ++r) {
        const int8_t* group = codes + r * k + g * kInt4Group + 4 * j;
        const __m256i x1 = _mm256_set1_epi32(four_codes(group)), x2 = _mm256_set1_epi32(four_codes(group + 16));
        for (int p = 0; p < panels; ++p)
          for (int h = 0; h < 2; ++h) {
            const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(wl[p][h], x1),
                                                   _mm256_maddubs_epi16(wh[p][h], x2));
            acc[r][p][h] = _mm256_add_epi32(acc[r][p][h], _mm256_madd_epi16(pairs, ones));
          }
      }
    }
    for (int r = 0; r < rows; ++r)
      for (int p = 0; p < panels; ++p) dots[r][p] = {acc[r][p][0], acc[r][p][1]};
#endif
    for (int p = 0; p < panels; ++p) {
      const uint8_t* block = weights + p * panel_bytes + g * kInt4Block + kInt4Codes;
      const V16 scale = halves16(block), minimum = halves16(block + 32);
      for (int r = 0; r < rows; ++r) {
        total[r][p] = fmadd(to_floats(dots[r][p]), scale * set16(group_scales[r * groups + g]), total[r][p]);
        total[r][p] = fmadd(minimum, set16(group_sums[r * groups + g]), total[r][p]);
      }
    }
  }
  for (int p = 0; p < panels && n0 + p * kPanel < n; ++p)
    for (int r = 0; r < rows; ++r) store_panel(total[r][p], bias, n0 + p * kPanel, n, out + r * n);
}

template <int rows>
void int4_row_block(const int8_t* codes, int64_t k, const float* group_scales, const float* group_sums,
                    const uint8_t* weights, const float* bias, int64_t panel, int64_t count, int64_t n, float* out) {
  const uint8_t* w = weights + panel * (k / kInt4Group) * kInt4Block;
  if (count == 2)
    int4_micro_kernel<rows, 2>(codes, k, group_scales, group_sums, w, bias, panel * kPanel, n, out);
  else
    int4_micro_kernel<rows, 1>(codes, k, group_scales, group_sums, w, bias, panel * kPanel, n, out);
}

// float32: weights packed per panel of 16 output rows as [panels, k, 16], each input's 16 weights side by side: one
// fused multiply-add with the input broadcast. Each output is summed over its inputs in order, whatever the rows.
template <int rows, int panels>
void float_micro_kernel(const float* x, int64_t k, const float* weights, const float* bias, int64_t n0, int64_t n,
                        float* out) {
  V16 acc[rows][panels];
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < panels; ++p) acc[r][p] = zero16();
  const int64_t panel_floats = k * kPanel;
  for (int64_t i = 0; i < k; ++i) {
    V16 w[panels];
    for (int p = 0; p < panels; ++p) w[p] = load16(weights + p * panel_floats + i * kPanel);
    for (int r = 0; r < rows; ++r) {
      const V16 input = set16(x[r * k + i]);
      for (int p = 0; p < panels; ++p) acc[r][p] = fmadd(input, w[p], acc[r][p]);
    }
  }
  for (int p = 0; p < panels && n0 + p * kPanel < n; ++p)
    for (int r = 0; r < rows; ++r) store_panel(acc[r][p], bias, n0 + p * kPanel, n, out + r * n);
}

template <int rows>
void float_row_block(const float* x, int64_t k, const float* weights, const float* bias, int64_t panel,
                     int64_t count, int64_t n, float* out) {
  const float* w = weights + panel * k * kPanel;
  if (count == 4)
    float_micro_kernel<rows, 4>(x, k, w, bias, panel * kPanel, n, out);
  else if (count == 2)
    float_micro_kernel<rows, 2>(x, k, w, bias, panel * kPanel, n, out);
  else
    float_micro_kernel<rows, 1>(x, k, w, bias, panel * kPanel, n, out);
}

// A product's inputs as rows of `k` features, and the [..., out_features] output it fills.
std::pair<at::Tensor, at::Tensor> rows_and_output(const at::Tensor& inputs, int64_t k, int64_t out_features) {
  auto sizes = inputs.sizes().vec();
  sizes.back() = out_features;
  return {inputs.reshape({-1, k}).contiguous(), at::empty(sizes, inputs.options())};
}

// The bias of a product's `out_features` outputs, or nullptr.
const float* bias_of(const c10::optional<at::Tensor>& bias, int64_t out_features, const char* op) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == out_features && bias->is_contiguous(), op,
              ": a float32 bias of out_features expected");
  return bias->data_ptr<float>();
}

// One product's packed weights, checked against its `k` inputs and `out` outputs: int8 (`pack_int8_weight`'s
// panels, row sums and scales) or int4 (`pack_int4_weight`'s blocks).
struct Product {
  enum Kind { kInt8, kInt4, kFloat } kind = kInt8;
  const void* weights = nullptr;
  const int32_t* sums = nullptr;  // int8 only
  const float* scales = nullptr;  // int8 only
  const float* bias = nullptr;
  int64_t k = 0, padded = 0, panels = 0, out = 0;
};

Product int8_product(const at::Tensor& weights, const at::Tensor& sums, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias, int64_t k, int64_t out_features) {
  TORCH_CHECK(weights.scalar_type() == at::kChar && weights.dim() == 4 && weights.size(2) == kPanel &&
                  weights.size(3) == kGroup && weights.is_contiguous(),
              "int8_linear: weights packed by pack_int8_weight expected");
  const int64_t rows_packed = weights.size(0) * kPanel;
  TORCH_CHECK(out_features <= rows_packed && sums.scalar_type() == at::kInt && sums.numel() == rows_packed &&
                  scales.scalar_type() == at::kFloat && scales.numel() == rows_packed,
              "int8_linear: sums and scales of the packed weights expected");
  Product product;
  product.padded = weights.size(1) * kGroup;
  TORCH_CHECK(k <= product.padded && product.padded - k < kGroup, "int8_linear: inputs have ", k,
              " features, the weights ", product.padded);
  product.weights = weights.data_ptr<int8_t>();
  product.sums = sums.data_ptr<int32_t>();
  product.scales = scales.data_ptr<float>();
  product.bias = bias_of(bias, out_features, "int8_linear");
  product.k = k;
  product.panels = weights.size(0);
  product.out = out_features;
  return product;
}

// A product its weights describe alone (int4, float32): no padded inputs, no sums or scales beside them.
Product weights_only_product(Product::Kind kind, const at::Tensor& weights, const float* bias, int64_t k,
                             int64_t out_features) {
  Product product;
  product.kind = kind;
  product.weights = weights.data_ptr();
  product.bias = bias;
  product.k = product.padded = k;
  product.panels = weights.size(0);
  product.out = out_features;
  return product;
}

Product int4_product(const at::Tensor& weights, const c10::optional<at::Tensor>& bias, int64_t k,
                     int64_t out_features) {
  TORCH_CHECK(k % kInt4Group == 0, "int4_linear: inputs of a multiple of 32 features expected");
  TORCH_CHECK(weights.scalar_type() == at::kByte && weights.dim() == 3 && weights.size(1) == k / kInt4Group &&
                  weights.size(2) == kInt4Block && weights.is_contiguous(),
              "int4_linear: weights packed by pack_int4_weight for ", k, " features expected");
  TORCH_CHECK(out_features <= weights.size(0) * kPanel, "int4_linear: more outputs than the packed weights have");
  return weights_only_product(Product::kInt4, weights, bias_of(bias, out_features, "int4_linear"), k, out_features);
}

Product float_product(const at::Tensor& weights, const c10::optional<at::Tensor>& bias, int64_t k,
                      int64_t out_features) {
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 3 && weights.size(1) == k &&
                  weights.size(2) == kPanel && weights.is_contiguous(),
              "float_linear: weights packed by pack_float_weight for ", k, " features expected");
  TORCH_CHECK(out_features <= weights.size(0) * kPanel, "float_linear: more outputs than the packed weights have");
  return weights_only_product(Product::kFloat, weights, bias_of(bias, out_features, "float_linear"), k, out_features);
}

void multiply_float(const Product& product, const float* x, int64_t m, float* out) {
  const int64_t k = product.k, panels = product.panels, n = product.out;
  const float* weights = static_cast<const float*>(product.weights);
  const float* bias = product.bias;
  at::parallel_for(0, panels, 1, [&](int64_t first, int64_t last) {
    for (int64_t panel = first; panel < last;) {
      const int64_t count = panels_next(last - panel);
      for (int64_t r = 0; r < m; r += kRows) {
        const float* rows_in = x + r * k;
        float* o = out + r * n;
        switch (std::min(kRows, m - r)) {
          case 4: float_row_block<4>(rows_in, k, weights, bias, panel, count, n, o); break;
          case 3: float_row_block<3>(rows_in, k, weights, bias, panel, count, n, o); break;
          case 2: float_row_block<2>(rows_in, k, weights, bias, panel, count, n, o); break;
          default: float_row_block<1>(rows_in, k, weights, bias, panel, count, n, o); break;
        }
      }
      panel += count;
    }
  });
}

// A product from an op's list of its parts: [weights, sums, scales, bias] for int8, [weights, None, None, bias]
// for int4 and float32 (what `native.product_parts` gives).
Product product_of(const c10::List<c10::optional<at::Tensor>>& parts, int64_t k, int64_t out_features) {
  TORCH_CHECK(parts.size() == 4 && parts.get(0).has_value(), "a product's [weights, sums, scales, bias] expected");
  const at::Tensor weights = *parts.get(0);
  if (weights.scalar_type() == at::kByte) return int4_product(weights, parts.get(3), k, out_features);
  if (weights.scalar_type() == at::kFloat) return float_product(weights, parts.get(3), k, out_features);
  TORCH_CHECK(parts.get(1).has_value() && parts.get(2).has_value(), "an int8 product's sums and scales expected");
  return int8_product(weights, *parts.get(1), *parts.get(2), parts.get(3), k, out_features);
}

void multiply_int4(const Product& product, const float* x, int64_t m, float* out) {
  const int64_t k = product.k, panels = product.panels, n = product.out, groups = k / kInt4Group;
  at::Tensor codes = at::empty({m, k}, at::kChar);
  at::Tensor group_scales = at::empty({m, groups}, at::kFloat);
  at::Tensor group_sums = at::empty({m, groups}, at::kFloat);
  quantize_groups(x, m, k, codes.data_ptr<int8_t>(), group_scales.data_ptr<float>(), group_sums.data_ptr<float>());
  const int8_t* code_data = codes.data_ptr<int8_t>();
  const float* scale_data = group_scales.data_ptr<float>();
  const float* sum_data = group_sums.data_ptr<float>();
  const uint8_t* weights = static_cast<const uint8_t*>(product.weights);
  const float* bias = product.bias;
  at::parallel_for(0, panels, 1, [&](int64_t first, int64_t last) {
    for (int64_t panel = first; panel < last; panel += kInt4Panels) {
      const int64_t count = std::min(kInt4Panels, last - panel);
      for (int64_t r = 0; r < m; r += kRows) {
        const int8_t* c = code_data + r * k;
        const float* s = scale_data + r * groups;
        const float* g = sum_data + r * groups;
        float* o = out + r * n;
        switch (std::min(kRows, m - r)) {
          case 4: int4_row_block<4>(c, k, s, g, weights, bias, panel, count, n, o); break;
          case 3: int4_row_block<3>(c, k, s, g, weights, bias, panel, count, n, o); break;
          case 2: int4_row_block<2>(c, k, s, g, weights, bias, panel, count, n, o); break;
          default: int4_row_block<1>(c, k, s, g, weights, bias, panel, count, n, o); break;
        }
      }
    }
  });
}

// `m` rows of `product.k` inputs times the product's weights, into `m` rows of `product.out` outputs. Each thread
// takes one run of panels, as many as the others give or take one (runs of whole groups of four left one of two
// threads a fifth more of SmolLM2's 36-panel products); threads that take the next panels as they come free were
// slower, with the event loop beside them too (135-140 against 158 tok/s, one stream, int8, 2-core AMD EPYC).
void multiply(const Product& product, const float* x, int64_t m, float* out) {
  if (m == 0) return;
  if (product.kind == Product::kInt4) return multiply_int4(product, x, m, out);
  if (product.kind == Product::kFloat) return multiply_float(product, x, m, out);
  const int64_t padded = product.padded, panels = product.panels;
  at::Tensor codes = at::empty({m, padded}, at::kByte);
  at::Tensor row_scales = at::empty({m}, at::kFloat);
  quantize_rows(x, m, product.k, padded, codes.data_ptr<uint8_t>(), row_scales.data_ptr<float>());
  const uint8_t* code_data = codes.data_ptr<uint8_t>();
  const float* row_scale_data = row_scales.data_ptr<float>();
  const int8_t* weights = static_cast<const int8_t*>(product.weights);
  at::parallel_for(0, panels, 1, [&](int64_t first, int64_t last) {
    panels_kernel(code_data, m, padded, row_scale_data, weights, product.sums, product.scales, product.bias, first,
                  last, product.out, out);
  });
}

// The inputs' features (their last size), once they are checked to be float32 rows.
int64_t features_of(const at::Tensor& inputs, const char* op) {
  TORCH_CHECK(inputs.scalar_type() == at::kFloat && inputs.dim() >= 1, op, ": float32 inputs expected");
  return inputs.size(-1);
}

// A product op: `inputs` [..., k] times `product`, into [..., out].
at::Tensor product_op(const at::Tensor& inputs, const Product& product) {
  const auto [x, out] = rows_and_output(inputs, product.k, product.out);
  multiply(product, x.data_ptr<float>(), x.size(0), out.data_ptr<float>());
  return out;
}

at::Tensor int8_linear(const at::Tensor& inputs, const at::Tensor& weights, const at::Tensor& sums,
                       const at::Tensor& scales, const c10::optional<at::Tensor>& bias, int64_t out_features) {
  const int64_t k = features_of(inputs, "int8_linear");
  return product_op(inputs, int8_product(weights, sums, scales, bias, k, out_features));
}

at::Tensor int4_linear(const at::Tensor& inputs, const at::Tensor& weights, const c10::optional<at::Tensor>& bias,
                       int64_t out_features) {
  return product_op(inputs, int4_product(weights, bias, features_of(inputs, "int4_linear"), out_features));
}

at::Tensor float_linear(const at::Tensor& inputs, const at::Tensor& weights, const c10::optional<at::Tensor>& bias,
                        int64_t out_features) {
  return product_op(inputs, float_product(weights, bias, features_of(inputs, "float_linear"), out_features));
}

// x * sigmoid(x) as x / (1 + e^-x) for `n` floats, sixteen at a time (the last ones masked): every element takes the
// same instructions wherever it lies, so a gate gets the same bits in `silu` and in `layer_output`.
void silu_into(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const V16 v = load16(x + i, n - i);
    store16(out + i, v / (set16(1.0f) + exp16(zero16() - v)), n - i);
  }
}

at::Tensor silu(const at::Tensor& inputs) {
  TORCH_CHECK(inputs.scalar_type() == at::kFloat, "silu: float32 inputs expected");
  const at::Tensor x = inputs.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel(), chunk = 16 * 1024;
  const float* x_data = x.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      silu_into(x_data + c * chunk, std::min(chunk, n - c * chunk), out_data + c * chunk);
  });
  return out;
}

// Keys or values of a cache, [rows, key heads, columns, dim] with these strides (the last one 1).
struct Columns {
  float* data;
  int64_t row, head, column;
};

// Each new position's attention, for every row and head, as a one-token step at its place computes it: softmax(q .
// k * scale) . v over the row's columns up to the position's own (`columns` less the `fed - 1 - j` new ones after
// position j), those `mask` (bool [rows, fed, columns], or nullptr) leaves out skipped. `queries`: each position's
// heads side by side, positions `query_stride` floats apart (a row's `fed` one after the other); the query heads of
// a key head (`heads / key_heads` of them, at most 8) read each key and value once. Each position and key head is
// computed by one thread in one order, whatever else is in the call. `out`: [rows, fed, heads, dim].
void attend_rows(const float* queries, int64_t query_stride, int64_t rows, int64_t fed, int64_t heads, int64_t dim,
                 const Columns& keys, const Columns& values, int64_t key_heads, int64_t columns, const bool* mask,
                 float scale, float* out) {
  const int64_t groups = heads / key_heads, chunks = dim / 16;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, columns * dim * groups));
  at::parallel_for(0, rows * fed * key_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(groups * ((columns + 15) / 16 * 16));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t position = task / key_heads, kh = task % key_heads, r = position / fed;
      const int64_t seen_columns = columns - fed + 1 + position % fed, padded = (seen_columns + 15) / 16 * 16;
      const float* q = queries + position * query_stride + kh * groups * dim;
      const float* k = keys.data + r * keys.row + kh * keys.head;
      const float* v = values.data + r * values.row + kh * values.head;
      const bool* seen = mask ? mask + position * columns : nullptr;
      for (int64_t c = 0; c < padded; ++c) {
        const bool skip = c >= seen_columns || (seen && !seen[c]);
        for (int64_t g = 0; g < groups; ++g) {
          if (skip) {
            scores[g * padded + c] = -std::numeric_limits<float>::infinity();
            continue;
          }
          V16 lanes = zero16();
          for (int64_t i = 0; i < chunks; ++i)
            lanes = lanes + load16(q + g * dim + 16 * i) * load16(k + c * keys.column + 16 * i);
          scores[g * padded + c] = sum16(lanes) * scale;
        }
      }
      float inverse[8];
      for (int64_t g = 0; g < groups; ++g) {
        float* row = scores.data() + g * padded;
        V16 largest = set16(-std::numeric_limits<float>::infinity());
        for (int64_t c = 0; c < padded; c += 16) largest = larger(largest, load16(row + c));
        const float top = largest16(largest);
        const V16 shift = set16(top == -std::numeric_limits<float>::infinity() ? 0.0f : top);
        V16 total = zero16();
        for (int64_t c = 0; c < padded; c += 16) {
          const V16 weights = exp16(load16(row + c) - shift);
          store16(row + c, weights);
          total = total + weights;
        }
        const float sum = sum16(total);
        inverse[g] = sum > 0.0f ? 1.0f / sum : 0.0f;  // nothing visible: zeros
      }
      V16 sums[8][16];
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t i = 0; i < chunks; ++i) sums[g][i] = zero16();
      for (int64_t c = 0; c < seen_columns; ++c) {
        const float* column = v + c * values.column;
        for (int64_t g = 0; g < groups; ++g) {
          const float weight = scores[g * padded + c];
          if (weight == 0.0f) continue;
          const V16 times = set16(weight);
          for (int64_t i = 0; i < chunks; ++i) sums[g][i] = sums[g][i] + times * load16(column + 16 * i);
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        float* o = out + (position * heads + kh * groups + g) * dim;
        const V16 times = set16(inverse[g]);
        for (int64_t i = 0; i < chunks; ++i) store16(o + 16 * i, sums[g][i] * times);
      }
    }
  });
}

// Whether `one_query_attention`'s registers take heads of `dim` with `groups` query heads a key head.
bool heads_fit(int64_t dim, int64_t groups) { return dim % 16 == 0 && dim <= 256 && groups <= 8; }

// A cache's keys or values [rows, key heads, columns, dim] as `Columns`, checked to be float32 of these sizes.
Columns columns_of(const at::Tensor& cache, int64_t rows, int64_t key_heads, int64_t columns, int64_t dim,
                   const char* op) {
  TORCH_CHECK(cache.scalar_type() == at::kFloat && cache.dim() == 4 && cache.size(0) == rows &&
                  cache.size(1) == key_heads && cache.size(2) == columns && cache.size(3) == dim &&
                  cache.stride(3) == 1,
              op, ": float32 keys and values of [rows, key heads, columns, head_dim] expected");
  return {cache.data_ptr<float>(), cache.stride(0), cache.stride(1), cache.stride(2)};
}

// A boolean [rows or 1, 1, fed, columns] attention mask as [rows, fed, columns] (true: attend); undefined for none.
at::Tensor visible_columns(const c10::optional<at::Tensor>& mask, int64_t rows, int64_t fed, int64_t columns,
                           const char* op) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 4 && mask->size(-1) == columns &&
                  (mask->size(0) == rows || mask->size(0) == 1) && mask->size(1) == 1 && mask->size(2) == fed,
              op, ": a boolean [rows, 1, new positions, columns] mask expected");
  return mask->expand({rows, 1, fed, columns}).contiguous();
}

// Each new query position's attention as a one-token step at its place computes it (`attend_rows`): query [rows,
// heads, fed, dim], the last `fed` of the columns; key, value [rows, key heads, columns, dim] (any strides but the
// last); mask bool [rows or 1, 1, fed, columns] or none; a head size that is a multiple of 16 up to 256, at most 8
// query heads a key head. Returns [rows, fed, heads, dim].
at::Tensor one_query_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                               const c10::optional<at::Tensor>& mask, double scaling) {
  TORCH_CHECK(query.scalar_type() == at::kFloat && query.dim() == 4 && key.dim() == 4 && query.size(2) >= 1 &&
                  query.size(2) <= key.size(2),
              "one_query_attention: float32 queries of the last columns' positions expected");
  const int64_t rows = query.size(0), heads = query.size(1), fed = query.size(2), dim = query.size(3);
  const int64_t key_heads = key.size(1), columns = key.size(2);
  TORCH_CHECK(key_heads > 0 && heads % key_heads == 0 && heads_fit(dim, heads / key_heads),
              "one_query_attention: a head size that is a multiple of 16 up to 256 and at most 8 query heads a key "
              "head expected");
  const Columns keys = columns_of(key, rows, key_heads, columns, dim, "one_query_attention");
  const Columns values = columns_of(value, rows, key_heads, columns, dim, "one_query_attention");
  const at::Tensor visible = visible_columns(mask, rows, fed, columns, "one_query_attention");
  const at::Tensor q = query.transpose(1, 2).contiguous();  // [rows, fed, heads, dim]: a position's heads together
  at::Tensor out = at::empty({rows, fed, heads, dim}, query.options());
  attend_rows(q.data_ptr<float>(), heads * dim, rows, fed, heads, dim, keys, values, key_heads, columns,
              visible.defined() ? visible.data_ptr<bool>() : nullptr, static_cast<float>(scaling),
              out.data_ptr<float>());
  return out;
}

// weight * (x * (1 / sqrt(mean(x * x) + eps))) for each of `m` rows of `k`, as transformers' LlamaRMSNorm computes
// it in float32, the sum of squares in sixteen lanes (then added across) instead of torch's order.
void norm_rows(const float* x, int64_t m, int64_t k, const float* weight, float eps, float* out) {
  const int64_t vectorised = k - k % 16;
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x + r * k;
      float* o = out + r * k;
      V16 lanes = zero16();
      for (int64_t i = 0; i < vectorised; i += 16) {
        const V16 v = load16(row + i);
        lanes = lanes + v * v;
      }
      float squares = sum16(lanes);
      for (int64_t i = vectorised; i < k; ++i) squares += row[i] * row[i];
      const float scale = 1.0f / std::sqrt(squares / static_cast<float>(k) + eps);
      const V16 times = set16(scale);
      for (int64_t i = 0; i < vectorised; i += 16) store16(o + i, load16(weight + i) * (load16(row + i) * times));
      for (int64_t i = vectorised; i < k; ++i) o[i] = weight[i] * (row[i] * scale);
    }
  });
}

const float* norm_weight_of(const at::Tensor& weight, int64_t k) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == k && weight.is_contiguous(),
              "rms_norm: a float32 weight of the inputs' last size expected");
  return weight.data_ptr<float>();
}

at::Tensor rms_norm(const at::Tensor& inputs, const at::Tensor& weight, double eps) {
  TORCH_CHECK(inputs.scalar_type() == at::kFloat && inputs.dim() >= 1, "rms_norm: float32 inputs expected");
  const int64_t k = inputs.size(-1);
  const float* w = norm_weight_of(weight, k);
  const at::Tensor x = inputs.contiguous();
  at::Tensor out = at::empty_like(x);
  norm_rows(x.data_ptr<float>(), k == 0 ? 0 : x.numel() / k, k, w, static_cast<float>(eps), out.data_ptr<float>());
  return out;
}

// A Llama-style decoder layer up to its attention, for `m` positions `x` of `k` features: the norm (into `normed`),
// the stacked query, key and value product (into `out`, `product.out` a position), and the rotary embedding of the
// first `rotated` outputs (queries and keys), a head of `head_dim` at a time, as the lean pass's `AttentionInput`
// computes them (the same kernels; each rotated value is x * cos + x' * signed sin, two products and a sum each
// rounded once, as torch's three ops round them). `cos`/`sin`: `head_dim` a position, the sines signed
// (`decoder.signed_sines`).
void attention_input_rows(const float* x, int64_t m, int64_t k, const float* norm_weight, float eps,
                          const Product& product, const float* cos, const float* sin, int64_t rotated,
                          int64_t head_dim, float* normed, float* out) {
  norm_rows(x, m, k, norm_weight, eps, normed);
  multiply(product, normed, m, out);
  const int64_t half = head_dim / 2, width = product.out;
  float head[512];
  for (int64_t r = 0; r < m; ++r) {
    const float* c = cos + r * head_dim;
    const float* s = sin + r * head_dim;
    for (int64_t start = 0; start < rotated; start += head_dim) {
      float* v = out + r * width + start;
      std::copy(v, v + head_dim, head);
      for (int64_t i = 0; i < head_dim; ++i) {
        const float straight = head[i] * c[i];
        const float swapped = head[(i + half) % head_dim] * s[i];
        v[i] = straight + swapped;
      }
    }
  }
}

// Whether heads of `head_dim` rotate in `attention_input_rows`.
bool rotates(int64_t head_dim) { return head_dim > 0 && head_dim % 2 == 0 && head_dim <= 512; }

// A Llama-style decoder layer after its attention, for `m` positions, as the lean pass's `LayerOutput` computes it:
// `h` (the layer's input, `k` features a position) becomes h + o(attended), then that plus down(silu(gate) * up) of
// its norm (`silu`'s SiLU). `attended`: `o.k` a position. Scratch: `normed` and `mlp` of `k` a position, `both` of
// `2 * gate_size`, `gated` of `gate_size`.
void layer_output_rows(float* h, const float* attended, int64_t m, int64_t k, const Product& o,
                       const float* norm_weight, float eps, const Product& gate_up, int64_t gate_size,
                       const Product& down, float* normed, float* both, float* gated, float* mlp) {
  multiply(o, attended, m, mlp);
  for (int64_t i = 0; i < m * k; ++i) h[i] = h[i] + mlp[i];
  norm_rows(h, m, k, norm_weight, eps, normed);
  multiply(gate_up, normed, m, both);
  for (int64_t r = 0; r < m; ++r) {
    const float* gate = both + r * 2 * gate_size;
    const float* up = gate + gate_size;
    float* g = gated + r * gate_size;
    silu_into(gate, gate_size, g);
    for (int64_t i = 0; i < gate_size; ++i) g[i] = g[i] * up[i];
  }
  multiply(down, gated, m, mlp);
  for (int64_t i = 0; i < m * k; ++i) h[i] = h[i] + mlp[i];
}

// `attention_input_rows` for `hidden` [rows, fed, hidden]; `cos`/`sin`: [rows, fed, 1, head_dim]. Returns queries,
// keys and values [rows, heads, fed, head_dim] (views of one tensor, as `AttentionInput`'s).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_input(
    const at::Tensor& hidden, const at::Tensor& norm_weight, double eps,
    const c10::List<c10::optional<at::Tensor>>& product, int64_t out_features, const at::Tensor& cos,
    const at::Tensor& sin, int64_t queries_size, int64_t keys_size, int64_t head_dim) {
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.dim() == 3, "attention_input: float32 [rows, fed, hidden]");
  const int64_t rows = hidden.size(0), fed = hidden.size(1), k = hidden.size(2), m = rows * fed;
  const int64_t rotated = queries_size + keys_size;
  TORCH_CHECK(rotates(head_dim) && queries_size % head_dim == 0 && keys_size % head_dim == 0 &&
                  out_features - rotated == keys_size,
              "attention_input: queries, keys and values of whole heads expected");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == m * head_dim && sin.numel() == m * head_dim,
              "attention_input: contiguous float32 cos and sin of [rows, fed, 1, head_dim] expected");
  const Product stacked = product_of(product, k, out_features);
  const at::Tensor x = hidden.contiguous();
  at::Tensor normed = at::empty({m, k}, x.options());
  at::Tensor out = at::empty({rows, fed, out_features}, x.options());
  attention_input_rows(x.data_ptr<float>(), m, k, norm_weight_of(norm_weight, k), static_cast<float>(eps), stacked,
                       cos.data_ptr<float>(), sin.data_ptr<float>(), rotated, head_dim, normed.data_ptr<float>(),
                       out.data_ptr<float>());
  auto heads_of = [&](int64_t begin, int64_t size) {
    return out.narrow(2, begin, size).view({rows, fed, size / head_dim, head_dim}).transpose(1, 2);
  };
  return {heads_of(0, queries_size), heads_of(queries_size, keys_size), heads_of(rotated, keys_size)};
}

// `layer_output_rows` for hidden [rows, fed, hidden] and attended [rows, fed, heads, head_dim]; returns the layer's
// output [rows, fed, hidden].
at::Tensor layer_output(const at::Tensor& hidden, const at::Tensor& attended,
                        const c10::List<c10::optional<at::Tensor>>& o_product, const at::Tensor& norm_weight,
                        double eps, const c10::List<c10::optional<at::Tensor>>& gate_up_product, int64_t gate_size,
                        const c10::List<c10::optional<at::Tensor>>& down_product) {
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.dim() == 3 && attended.scalar_type() == at::kFloat &&
                  attended.size(0) == hidden.size(0) && attended.size(1) == hidden.size(1),
              "layer_output: float32 hidden [rows, fed, hidden] and attended [rows, fed, heads, head_dim] expected");
  const int64_t k = hidden.size(2), m = hidden.size(0) * hidden.size(1);
  const at::Tensor a = attended.reshape({m, -1}).contiguous();
  const Product o = product_of(o_product, a.size(1), k);
  const Product gate_up = product_of(gate_up_product, k, 2 * gate_size);
  const Product down = product_of(down_product, gate_size, k);
  const float* w = norm_weight_of(norm_weight, k);
  at::Tensor out = hidden.contiguous().clone();
  at::Tensor scratch = at::empty({m, 2 * k + 3 * gate_size}, out.options());
  float* normed = scratch.data_ptr<float>();
  float* mlp = normed + m * k;
  float* both = mlp + m * k;
  layer_output_rows(out.data_ptr<float>(), a.data_ptr<float>(), m, k, o, w, static_cast<float>(eps), gate_up,
                    gate_size, down, normed, both, both + m * 2 * gate_size, mlp);
  return out;
}

// Every layer of a Llama-style model, as a decoding step runs them: each layer's norms, stacked products, sizes and
// attention scaling, checked once when the model's plan is made (`native.OwnDecodingSteps`) and held (with the
// tensors they point into) for `decode_layers`.
struct DecodingLayers : torch::CustomClassHolder {
  struct Layer {
    const float* input_norm;
    const float* post_norm;
    float input_eps, post_eps, scaling;
    Product qkv, o, gate_up, down;
    int64_t queries, keys, head_dim, gate_size;
  };
  static constexpr int64_t kParts = 18;  // input norm, post norm, then the four products' [weights, sums, scales, bias]
  static constexpr int64_t kFloats = 3;  // input eps, post eps, scaling
  static constexpr int64_t kSizes = 5;   // qkv outputs, queries, keys, head_dim, gate_size

  c10::List<c10::optional<at::Tensor>> parts;
  std::vector<Layer> layers;
  int64_t hidden = 0, widest_qkv = 0, widest_queries = 0, widest_gate = 0;

  DecodingLayers(c10::List<c10::optional<at::Tensor>> parts_, std::vector<double> floats, std::vector<int64_t> sizes)
      : parts(std::move(parts_)) {
    const int64_t count = static_cast<int64_t>(parts.size()) / kParts;
    TORCH_CHECK(count > 0 && static_cast<int64_t>(parts.size()) == count * kParts &&
                    static_cast<int64_t>(floats.size()) == count * kFloats &&
                    static_cast<int64_t>(sizes.size()) == count * kSizes,
                "DecodingLayers: 18 parts, 3 floats and 5 sizes a layer expected");
    for (int64_t l = 0; l < count; ++l) {
      auto part = [&](int64_t i) -> const c10::optional<at::Tensor> { return parts.get(l * kParts + i); };
      auto product = [&](int64_t first, int64_t k, int64_t out) {
        c10::List<c10::optional<at::Tensor>> four;
        for (int64_t i = 0; i < 4; ++i) four.push_back(part(first + i));
        return product_of(four, k, out);
      };
      TORCH_CHECK(part(0).has_value() && part(1).has_value(), "DecodingLayers: each layer's two norms expected");
      const int64_t k = part(0)->numel();
      TORCH_CHECK(l == 0 || k == hidden, "DecodingLayers: layers of one hidden size expected");
      hidden = k;
      const int64_t* s = sizes.data() + l * kSizes;
      Layer layer;
      layer.qkv = product(2, k, s[0]);
      layer.queries = s[1];
      layer.keys = s[2];
      layer.head_dim = s[3];
      layer.gate_size = s[4];
      TORCH_CHECK(rotates(layer.head_dim) && layer.queries % layer.head_dim == 0 && layer.keys % layer.head_dim == 0 &&
                      layer.keys > 0 && layer.queries % layer.keys == 0 && s[0] == layer.queries + 2 * layer.keys &&
                      heads_fit(layer.head_dim, layer.queries / layer.keys),
                  "DecodingLayers: queries, keys and values of whole heads our attention takes expected");
      TORCH_CHECK(l == 0 || layer.head_dim == layers[0].head_dim, "DecodingLayers: layers of one head size expected");
      layer.o = product(6, layer.queries, k);
      layer.gate_up = product(10, k, 2 * layer.gate_size);
      layer.down = product(14, layer.gate_size, k);
      layer.input_norm = norm_weight_of(*part(0), k);
      layer.post_norm = norm_weight_of(*part(1), k);
      layer.input_eps = static_cast<float>(floats[l * kFloats]);
      layer.post_eps = static_cast<float>(floats[l * kFloats + 1]);
      layer.scaling = static_cast<float>(floats[l * kFloats + 2]);
      widest_qkv = std::max(widest_qkv, s[0]);
      widest_queries = std::max(widest_queries, layer.queries);
      widest_gate = std::max(widest_gate, layer.gate_size);
      layers.push_back(layer);
    }
  }
};

// A decoding step or verifying pass of every layer, `fed` new positions a row: for each layer,
// `attention_input_rows`, the new keys and values written into the last `fed` columns of its `keys` and `values`
// (the cache's columns, those included), `attend_rows` over them under `mask` (each position as a one-token step at
// its place), then `layer_output_rows`: the lean pass's halves and attention, in the same order, with no op between
// them. hidden [rows, fed, hidden]; cos/sin [rows, fed, 1, head_dim]; mask bool [rows, 1, fed, columns] or none.
// Returns [rows, fed, hidden].
at::Tensor decode_layers(const c10::intrusive_ptr<DecodingLayers>& model, const at::Tensor& hidden,
                         const at::Tensor& cos, const at::Tensor& sin, at::TensorList keys, at::TensorList values,
                         const c10::optional<at::Tensor>& mask) {
  const int64_t k = model->hidden, count = static_cast<int64_t>(model->layers.size());
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && hidden.dim() == 3 && hidden.size(2) == k,
              "decode_layers: float32 [rows, new positions, hidden] expected");
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == count && static_cast<int64_t>(values.size()) == count,
              "decode_layers: each layer's keys and values expected");
  const int64_t rows = hidden.size(0), fed = hidden.size(1), m = rows * fed, head_dim = model->layers[0].head_dim;
  TORCH_CHECK(m > 0 && keys[0].dim() == 4 && keys[0].size(2) >= fed, "decode_layers: the new positions' columns "
              "in the cache expected");
  const int64_t columns = keys[0].size(2);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == m * head_dim && sin.numel() == m * head_dim,
              "decode_layers: contiguous float32 cos and sin of [rows, new positions, 1, head_dim] expected");
  const at::Tensor visible = visible_columns(mask, rows, fed, columns, "decode_layers");
  const bool* seen = visible.defined() ? visible.data_ptr<bool>() : nullptr;
  at::Tensor out = hidden.contiguous().clone();
  const int64_t gate = model->widest_gate;
  at::Tensor scratch =
      at::empty({m, 2 * k + model->widest_qkv + model->widest_queries + 3 * gate}, out.options());
  float* normed = scratch.data_ptr<float>();
  float* mlp = normed + m * k;
  float* qkv = mlp + m * k;
  float* attended = qkv + m * model->widest_qkv;
  float* both = attended + m * model->widest_queries;
  float* gated = both + m * 2 * gate;
  float* h = out.data_ptr<float>();
  for (int64_t l = 0; l < count; ++l) {
    const DecodingLayers::Layer& layer = model->layers[l];
    const int64_t key_heads = layer.keys / head_dim, width = layer.qkv.out;
    const Columns key = columns_of(keys[l], rows, key_heads, columns, head_dim, "decode_layers");
    const Columns value = columns_of(values[l], rows, key_heads, columns, head_dim, "decode_layers");
    attention_input_rows(h, m, k, layer.input_norm, layer.input_eps, layer.qkv, cos.data_ptr<float>(),
                         sin.data_ptr<float>(), layer.queries + layer.keys, head_dim, normed, qkv);
    for (int64_t position = 0; position < m; ++position) {
      const int64_t r = position / fed, column = columns - fed + position % fed;
      for (int64_t kh = 0; kh < key_heads; ++kh) {
        const float* new_key = qkv + position * width + layer.queries + kh * head_dim;
        std::copy(new_key, new_key + head_dim, key.data + r * key.row + kh * key.head + column * key.column);
        std::copy(new_key + layer.keys, new_key + layer.keys + head_dim,
                  value.data + r * value.row + kh * value.head + column * value.column);
      }
    }
    attend_rows(qkv, width, rows, fed, layer.queries / head_dim, head_dim, key, value, key_heads, columns, seen,
                layer.scaling, attended);
    layer_output_rows(h, attended, m, k, layer.o, layer.post_norm, layer.post_eps, layer.gate_up, layer.gate_size,
                      layer.down, normed, both, gated, mlp);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(hf_openai_server, library) {
  library.class_<DecodingLayers>("DecodingLayers")
      .def(torch::init<c10::List<c10::optional<at::Tensor>>, std::vector<double>, std::vector<int64_t>>());
  library.def(
      "int8_linear(Tensor inputs, Tensor weights, Tensor sums, Tensor scales, Tensor? bias, int out_features) "
      "-> Tensor");
  library.def("int4_linear(Tensor inputs, Tensor weights, Tensor? bias, int out_features) -> Tensor");
  library.def("float_linear(Tensor inputs, Tensor weights, Tensor? bias, int out_features) -> Tensor");
  library.def("rms_norm(Tensor inputs, Tensor weight, float eps) -> Tensor");
  library.def("silu(Tensor inputs) -> Tensor");
  library.def("one_query_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scaling) -> Tensor");
  library.def(
      "attention_input(Tensor hidden, Tensor norm_weight, float eps, Tensor?[] product, int out_features, Tensor cos, "
      "Tensor sin, int queries_size, int keys_size, int head_dim) -> (Tensor, Tensor, Tensor)");
  library.def(
      "layer_output(Tensor hidden, Tensor attended, Tensor?[] o_product, Tensor norm_weight, float eps, "
      "Tensor?[] gate_up_product, int gate_size, Tensor?[] down_product) -> Tensor");
  library.def(
      "decode_layers(__torch__.torch.classes.hf_openai_server.DecodingLayers layers, Tensor hidden, Tensor cos, "
      "Tensor sin, Tensor(a!)[] keys, Tensor(b!)[] values, Tensor? mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_openai_server, CPU, library) {
  library.impl("int8_linear", &int8_linear);
  library.impl("int4_linear", &int4_linear);
  library.impl("float_linear", &float_linear);
  library.impl("rms_norm", &rms_norm);
  library.impl("silu", &silu);
  library.impl("one_query_attention", &one_query_attention);
  library.impl("attention_input", &attention_input);
  library.impl("layer_output", &layer_output);
  library.impl("decode_layers", &decode_layers);
}
