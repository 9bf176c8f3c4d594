// Packing a weight, and the packed linear as a torch call.
#include "linear.h"


// [N, K] weight -> [ceil(N / 64), K, 64] groups of four 16-column panels (zero-padded columns),
// same dtype.
torch::Tensor pack_linear_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2, "pack_linear_weight: weight must be 2-D");
  if (w.scalar_type() == torch::kBFloat16 && cpu_has_bf16_dot()) {
    // [groups][ceil(K / 2)][64][2]: the bf16 dot-product kernel's layout (last dim 128)
    const int64_t n = w.size(0), k = w.size(1), groups = (n + DOT_COLS - 1) / DOT_COLS;
    const int64_t pairs = (k + 1) / 2;
    auto padded = torch::zeros({groups * DOT_COLS, 2 * pairs}, w.options());
    padded.narrow(0, 0, n).narrow(1, 0, k).copy_(w);
    auto packed = padded.view({groups, DOT_COLS, pairs, 2}).permute({0, 2, 1, 3}).contiguous()
        .view({groups, pairs, 2 * DOT_COLS});
    if (halves_swapped(groups / 2, groups, pairs)) {
      auto middle = packed[groups / 2];
      middle.copy_(torch::cat({middle.narrow(0, pairs / 2, pairs - pairs / 2),
                               middle.narrow(0, 0, pairs / 2)}));
    }
    return packed;
  }
  const int64_t n = w.size(0), k = w.size(1), groups = (n + GROUP_COLS - 1) / GROUP_COLS;
  auto padded = torch::zeros({groups * GROUP_COLS, k}, w.options());
  padded.narrow(0, 0, n).copy_(w);
  // [groups, 4, 16, K] -> [groups, K, 4, 16]
  auto packed = padded.view({groups, GROUP, PANEL, k}).permute({0, 3, 1, 2});
  if (w.scalar_type() == torch::kBFloat16)  // word j of a panel row: columns j (low half), 8 + j
    packed = packed.reshape({groups, k, GROUP, 2, 8}).transpose(3, 4);
  return packed.contiguous().view({groups, k, GROUP_COLS});
}

torch::Tensor packed_linear(torch::Tensor x, torch::Tensor panels, int64_t n,
                            c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && panels.device().is_cpu(), "packed_linear: CPU tensors only");
  const bool dot = panels.dim() == 3 && dot_packed(panels);
  const int64_t cols = dot ? DOT_COLS : GROUP_COLS;
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == (dot ? 2 * DOT_COLS : GROUP_COLS) &&
              panels.is_contiguous() && panels.size(0) == (n + cols - 1) / cols,
              "packed_linear: panels from pack_linear_weight expected");
  const int64_t k = x.size(-1);
  TORCH_CHECK((dot ? (k + 1) / 2 : k) == panels.size(1), "packed_linear: x has ", k,
              " features, the packed weight another count");
  TORCH_CHECK(x.scalar_type() == panels.scalar_type() &&
              (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32),
              "packed_linear: x and weight must both be fp32 or both bf16");
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  auto rows = x.reshape({-1, k});
  const int64_t m = rows.size(0);
  auto y = torch::empty({m, n}, x.options());
  torch::Tensor b32;
  if (bias.has_value()) b32 = bias->to(torch::kFloat32).contiguous();
  const float* bp = bias.has_value() ? b32.data_ptr<float>() : nullptr;
  if (dot) {  // bf16 x as it is
    auto xc = rows.contiguous();
    dot_rows(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()),
             reinterpret_cast<const uint16_t*>(panels.data_ptr<at::BFloat16>()), bp,
             y.data_ptr<at::BFloat16>(), m, n, k);
    return y.view(out_shape);
  }
  auto x32 = rows.to(torch::kFloat32).contiguous();
  if (x.scalar_type() == torch::kBFloat16) {
    packed_rows(x32.data_ptr<float>(), panels.data_ptr<at::BFloat16>(), bp,
                y.data_ptr<at::BFloat16>(), m, n, k);
  } else {
    packed_rows(x32.data_ptr<float>(), panels.data_ptr<float>(), bp, y.data_ptr<float>(), m, n, k);
  }
  return y.view(out_shape);
}

torch::Tensor packed_linear_chain(torch::Tensor x, torch::Tensor panels, int64_t n,
                                  c10::optional<torch::Tensor> acc_in) {
  TORCH_CHECK(x.device().is_cpu() && panels.device().is_cpu(), "packed_linear_chain: CPU only");
  const bool dot = panels.dim() == 3 && dot_packed(panels);
  const int64_t k = x.size(-1);
  TORCH_CHECK(panels.dim() == 3 && panels.is_contiguous() &&
              (dot ? (k + 1) / 2 : k) == panels.size(1) &&
              x.scalar_type() == panels.scalar_type(),
              "packed_linear_chain: x and panels from pack_linear_weight must match");
  auto rows = x.reshape({-1, k});
  const int64_t m = rows.size(0);
  auto acc = acc_in.has_value() ? acc_in->to(torch::kFloat32).reshape({m, n}).clone()
                                : torch::zeros({m, n}, x.options().dtype(torch::kFloat32));
  TORCH_CHECK(acc.size(0) == m && acc.size(1) == n, "packed_linear_chain: acc must be [rows, n]");
  if (dot) {
    auto xc = rows.contiguous();
    dot_chain_rows(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()),
                   reinterpret_cast<const uint16_t*>(panels.data_ptr<at::BFloat16>()),
                   acc.data_ptr<float>(), m, n, k);
  } else {
    auto x32 = rows.to(torch::kFloat32).contiguous();
    if (x.scalar_type() == torch::kBFloat16)
      chain_rows(x32.data_ptr<float>(), panels.data_ptr<at::BFloat16>(), acc.data_ptr<float>(), m, n, k);
    else
      chain_rows(x32.data_ptr<float>(), panels.data_ptr<float>(), acc.data_ptr<float>(), m, n, k);
  }
  auto shape = x.sizes().vec();
  shape.back() = n;
  return acc.view(shape);
}
