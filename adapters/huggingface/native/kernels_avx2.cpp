// Kernels of our own for CPUs with AVX2 and FMA that lack AVX-512 VNNI (kernels.cpp needs it), built at run time by
// adapters/huggingface/native/__init__.py and registered as torch.ops.hf_openai_server.*:
//
// - float_linear: float32 weights packed in panels of 16 output rows (`pack_float_weight`, as kernels.cpp's), one
//   fused multiply-add per 8 weights with the input broadcast, each output summed over its inputs in order.
//
// A row goes through the same instructions whatever the other rows are, so it gets the same bits alone, in a batch
// or in a prompt; and the same bits as kernels.cpp's float_linear (one rounding per fused multiply-add, in order).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kPanel = 16;  // output rows per panel, as kernels.cpp packs them: two 256-bit registers
constexpr int64_t kRows = 4;    // input rows per micro-kernel

// `rows` input rows against `panels` (1 or 2) consecutive panels, the sums in registers.
template <int rows, int panels>
void float_micro_kernel(const float* x, int64_t k, const float* weights, const float* bias, int64_t n0, int64_t n,
                        float* out) {
  __m256 acc[rows][panels][2];
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < panels; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_ps();
  const int64_t panel_floats = k * kPanel;
  for (int64_t i = 0; i < k; ++i) {
    __m256 w[panels][2];
    for (int p = 0; p < panels; ++p) {
      w[p][0] = _mm256_loadu_ps(weights + p * panel_floats + i * kPanel);
      w[p][1] = _mm256_loadu_ps(weights + p * panel_floats + i * kPanel + 8);
    }
    for (int r = 0; r < rows; ++r) {
      const __m256 input = _mm256_set1_ps(x[r * k + i]);
      for (int p = 0; p < panels; ++p) {
        acc[r][p][0] = _mm256_fmadd_ps(input, w[p][0], acc[r][p][0]);
        acc[r][p][1] = _mm256_fmadd_ps(input, w[p][1], acc[r][p][1]);
      }
    }
  }
  for (int p = 0; p < panels; ++p) {
    const int64_t start = n0 + p * kPanel;
    if (start >= n) break;
    const int64_t count = std::min(kPanel, n - start);
    for (int r = 0; r < rows; ++r) {
      alignas(32) float sums[kPanel];
      _mm256_store_ps(sums, acc[r][p][0]);
      _mm256_store_ps(sums + 8, acc[r][p][1]);
      float* o = out + r * n + start;
      for (int64_t j = 0; j < count; ++j) o[j] = bias ? sums[j] + bias[start + j] : sums[j];
    }
  }
}

template <int rows>
void float_row_block(const float* x, int64_t k, const float* weights, const float* bias, int64_t panel,
                     int64_t count, int64_t n, float* out) {
  const float* w = weights + panel * k * kPanel;
  if (count == 2 && rows <= 2) {  // two panels' sums of more rows would not fit in the 16 registers
    float_micro_kernel<rows, 2>(x, k, w, bias, panel * kPanel, n, out);
    return;
  }
  for (int64_t p = 0; p < count; ++p)
    float_micro_kernel<rows, 1>(x, k, w + p * k * kPanel, bias, (panel + p) * kPanel, n, out);
}

at::Tensor float_linear(const at::Tensor& inputs, const at::Tensor& weights, const c10::optional<at::Tensor>& bias,
                        int64_t out_features) {
  TORCH_CHECK(inputs.scalar_type() == at::kFloat && inputs.dim() >= 1, "float_linear: float32 inputs expected");
  const int64_t k = inputs.size(-1);
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 3 && weights.size(1) == k &&
                  weights.size(2) == kPanel && weights.is_contiguous(),
              "float_linear: weights packed by pack_float_weight for ", k, " features expected");
  const int64_t panels = weights.size(0);
  TORCH_CHECK(out_features <= panels * kPanel, "float_linear: more outputs than the packed weights have");
  const float* bias_data = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == out_features && bias->is_contiguous(),
                "float_linear: a float32 bias of out_features expected");
    bias_data = bias->data_ptr<float>();
  }
  auto sizes = inputs.sizes().vec();
  sizes.back() = out_features;
  const at::Tensor x = inputs.reshape({-1, k}).contiguous();
  at::Tensor out = at::empty(sizes, inputs.options());
  const int64_t m = x.size(0);
  if (m == 0) return out;
  const float* x_data = x.data_ptr<float>();
  const float* w_data = weights.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, (panels + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = 2 * begin; panel < std::min(2 * end, panels); panel += 2) {
      const int64_t count = std::min<int64_t>(2, panels - panel);
      for (int64_t r = 0; r < m; r += kRows) {
        const float* rows_in = x_data + r * k;
        float* o = out_data + r * out_features;
        switch (std::min(kRows, m - r)) {
          case 4: float_row_block<4>(rows_in, k, w_data, bias_data, panel, count, out_features, o); break;
          case 3: float_row_block<3>(rows_in, k, w_data, bias_data, panel, count, out_features, o); break;
          case 2: float_row_block<2>(rows_in, k, w_data, bias_data, panel, count, out_features, o); break;
          default: float_row_block<1>(rows_in, k, w_data, bias_data, panel, count, out_features, o); break;
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(hf_openai_server, library) {
  library.def("float_linear(Tensor inputs, Tensor weights, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_openai_server, CPU, library) { library.impl("float_linear", &float_linear); }
