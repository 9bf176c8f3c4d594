// Ragged paged attention and the pool write as torch calls.
#include "paged.h"

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                              torch::Tensor table, torch::Tensor rows, torch::Tensor keys,
                              torch::Tensor starts) {
  TORCH_CHECK(q.dim() == 3 && (k_pool.dim() == 4 || k_pool.dim() == 5) && v_pool.dim() == 4,
              "paged_attention: q [N, Hq, D]; values [NB, Hkv, BS, D]; keys the same or in "
              "W-slot panels [NB, Hkv, BS / W, D, W]");
  const bool panel_keys = k_pool.dim() == 5;
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && table.is_contiguous(),
              "paged_attention: pool and table must be contiguous");
  for (const auto& t : {table, rows, keys, starts})
    TORCH_CHECK(t.scalar_type() == torch::kInt32 && t.is_contiguous(),
                "paged_attention: contiguous int32 metadata expected");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type(), "paged_attention: dtype mismatch");
  const int64_t n = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t hkv = v_pool.size(1), bs = v_pool.size(2), segments = starts.numel() - 1;
  if (panel_keys)
    check_key_panels(k_pool, bs, q.scalar_type() == torch::kBFloat16, d, "paged_attention");
  TORCH_CHECK(segments >= 0 && (segments == 0 || starts.data_ptr<int32_t>()[segments] == n),
              "paged_attention: segment starts must end at the token count");
  auto q32 = (q.to(torch::kFloat32) * (1.0 / std::sqrt(static_cast<double>(d)))).contiguous();
  auto out = torch::empty({n, hq, d}, torch::kFloat32);
  const PagedRows paged = PagedRows{table.data_ptr<int32_t>(), rows.data_ptr<int32_t>(),
                                    keys.data_ptr<int32_t>(), starts.data_ptr<int32_t>(),
                                    table.size(1), segments, hq, hkv, bs, d, panel_keys, PANEL}
                               .with_key_width(q.scalar_type() == torch::kBFloat16);
  if (q.scalar_type() == torch::kBFloat16) {
    paged_segments(paged, q32.data_ptr<float>(), k_pool.data_ptr<at::BFloat16>(),
                   v_pool.data_ptr<at::BFloat16>(), out.data_ptr<float>());
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kFloat32, "paged_attention: fp32 or bf16 only");
    paged_segments(paged, q32.data_ptr<float>(), k_pool.data_ptr<float>(),
                   v_pool.data_ptr<float>(), out.data_ptr<float>());
  }
  return out.to(q.scalar_type());
}

void paged_write_(torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor k, torch::Tensor v,
                  torch::Tensor blocks, torch::Tensor offsets) {
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && v_pool.dim() == 4,
              "paged_write_: contiguous pools expected");
  TORCH_CHECK(k.scalar_type() == k_pool.scalar_type() && v.scalar_type() == v_pool.scalar_type(),
              "paged_write_: dtype mismatch");
  auto kc = k.contiguous(), vc = v.contiguous();
  auto b = blocks.to(torch::kInt64).contiguous(), o = offsets.to(torch::kInt64).contiguous();
  const int64_t n = kc.size(0), hkv = v_pool.size(1), bs = v_pool.size(2), d = v_pool.size(3);
  TORCH_CHECK(kc.numel() == n * hkv * d && vc.numel() == n * hkv * d && b.numel() == n &&
              o.numel() == n, "paged_write_: k/v [N, Hkv, D] and N slots expected");
  const bool panel_keys = k_pool.dim() == 5;
  if (panel_keys) check_key_panels(k_pool, bs, k.scalar_type() == torch::kBFloat16, d, "paged_write_");
  if (k.scalar_type() == torch::kBFloat16) {
    write_rows(k_pool.data_ptr<at::BFloat16>(), v_pool.data_ptr<at::BFloat16>(), panel_keys,
               kc.data_ptr<at::BFloat16>(), vc.data_ptr<at::BFloat16>(), b.data_ptr<int64_t>(),
               o.data_ptr<int64_t>(), n, hkv, bs, d, hkv * d);
  } else {
    TORCH_CHECK(k.scalar_type() == torch::kFloat32, "paged_write_: fp32 or bf16 only");
    write_rows(k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), panel_keys,
               kc.data_ptr<float>(), vc.data_ptr<float>(), b.data_ptr<int64_t>(),
               o.data_ptr<int64_t>(), n, hkv, bs, d, hkv * d);
  }
}
