// GPTQ's loop inside one block of input features (surgery/gptq.py `snap_rows`): feature j of every row snapped to the
// row's nearest value, its error e = (w_j - q_j) / U_jj spread over the features after it in the block by
// w_j: -= e U_j,j:. Rows are independent, so each thread takes whole rows; per row the features run in order. The
// float operations are the torch loop's (a product rounded, then subtracted: no fused multiply-add), so the choices
// and errors equal its to the bit at any thread count.
#pragma GCC optimize("fp-contract=off")
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

// block (C, B) float32, updated in place; lut (C, k) float32: each row's values; u (B, B) float32: the block's rows
// of the upper Cholesky factor. Returns (indices (C, B) int64, errors (C, B) float32).
std::tuple<at::Tensor, at::Tensor> gptq_block(at::Tensor& block, const at::Tensor& lut, const at::Tensor& u) {
  TORCH_CHECK(block.dim() == 2 && lut.dim() == 2 && u.dim() == 2, "gptq_block: block (C, B), lut (C, k) and u (B, B) "
              "expected");
  const int64_t C = block.size(0), B = block.size(1), k = lut.size(1);
  TORCH_CHECK(lut.size(0) == C && u.size(0) == B && u.size(1) == B && k > 0, "gptq_block: shapes do not match: block ",
              block.sizes(), ", lut ", lut.sizes(), ", u ", u.sizes());
  TORCH_CHECK(block.scalar_type() == at::kFloat && lut.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat,
              "gptq_block: float32 tensors expected");
  TORCH_CHECK(block.is_contiguous() && lut.is_contiguous() && u.is_contiguous(), "gptq_block: contiguous tensors "
              "expected");
  TORCH_CHECK(block.device().is_cpu() && lut.device().is_cpu() && u.device().is_cpu(), "gptq_block: CPU tensors expected");
  auto indices = at::empty({C, B}, block.options().dtype(at::kLong));
  auto errors = at::empty({C, B}, block.options());
  float* pw = block.data_ptr<float>();
  const float* pl = lut.data_ptr<float>();
  const float* pu = u.data_ptr<float>();
  int64_t* pi = indices.data_ptr<int64_t>();
  float* pe = errors.data_ptr<float>();
  at::parallel_for(0, C, std::max<int64_t>(1, 16384 / std::max<int64_t>(B * B / 2 + B * k, 1)),
                   [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      float* w = pw + c * B;
      const float* values = pl + c * k;
      for (int64_t j = 0; j < B; ++j) {
        const float x = w[j];
        int64_t nearest = 0;
        float best = std::fabs(x - values[0]);
        for (int64_t i = 1; i < k; ++i) {
          const float distance = std::fabs(x - values[i]);
          if (distance < best) {  // the first of equal distances, as argmin
            best = distance;
            nearest = i;
          }
        }
        const float* row = pu + j * B;
        const float error = (x - values[nearest]) / row[j];
        for (int64_t i = j; i < B; ++i) {
          const float product = error * row[i];
          w[i] -= product;
        }
        pi[c * B + j] = nearest;
        pe[c * B + j] = error;
      }
    }
  });
  return {indices, errors};
}
