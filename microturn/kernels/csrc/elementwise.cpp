// The element-wise ops as torch calls.
#include "elementwise.h"

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: dtype mismatch");
  auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t d = x.size(-1), rows = d ? xc.numel() / d : 0;
  if (x.scalar_type() == torch::kBFloat16) {
    rms_norm_rows(xc.data_ptr<at::BFloat16>(), weight.data_ptr<at::BFloat16>(),
                  out.data_ptr<at::BFloat16>(), rows, d, static_cast<float>(eps));
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "rms_norm: fp32 or bf16 only");
    rms_norm_rows(xc.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), rows, d,
                  static_cast<float>(eps));
  }
  return out;
}

void rotary_qkv_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t q_heads,
                 int64_t kv_heads, int64_t head_dim, bool interleaved) {
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(),
              "rotary_qkv_: contiguous tensors expected");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32, "rotary_qkv_: cos/sin must be fp32");
  const int64_t width = qkv.size(-1), tokens = width ? qkv.numel() / width : 0;
  TORCH_CHECK(cos.numel() == tokens * head_dim / 2, "rotary_qkv_: one angle row per token");
  const int64_t heads = q_heads + kv_heads;  // q heads then k heads are contiguous
  if (qkv.scalar_type() == torch::kBFloat16) {
    rotary_rows(qkv.data_ptr<at::BFloat16>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                tokens, heads, width, head_dim, interleaved);
  } else {
    TORCH_CHECK(qkv.scalar_type() == torch::kFloat32, "rotary_qkv_: fp32 or bf16 only");
    rotary_rows(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), tokens,
                heads, width, head_dim, interleaved);
  }
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  auto x = gate_up.contiguous();
  auto shape = x.sizes().vec();
  const int64_t f = shape.back() / 2, rows = f ? x.numel() / (2 * f) : 0;
  shape.back() = f;
  auto out = torch::empty(shape, x.options());
  if (x.scalar_type() == torch::kBFloat16) {
    silu_mul_rows(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), rows, f);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "silu_mul: fp32 or bf16 only");
    silu_mul_rows(x.data_ptr<float>(), out.data_ptr<float>(), rows, f);
  }
  return out;
}

// cos/sin of the rotary angles, [*positions, D/2] fp32: the angle is rounded to fp32 as the
// reference computes it, then cos/sin are evaluated in double and rounded once. torch's own
// vectorised cos takes a scalar path for a tensor's tail elements, so its result for a
// position could depend on how many positions share the call; this one cannot.
std::vector<torch::Tensor> rotary_angles(torch::Tensor positions, torch::Tensor inv_freq) {
  TORCH_CHECK(inv_freq.scalar_type() == torch::kFloat32 && inv_freq.dim() == 1,
              "rotary_angles: inv_freq must be 1-D fp32");
  auto pos = positions.to(torch::kFloat32).contiguous();
  auto f = inv_freq.contiguous();
  const int64_t n = pos.numel(), half = f.numel();
  auto shape = positions.sizes().vec();
  shape.push_back(half);
  auto cos = torch::empty(shape, torch::kFloat32), sin = torch::empty(shape, torch::kFloat32);
  const float* pp = pos.data_ptr<float>();
  angles_into(n, [&](int64_t t) { return pp[t]; }, f.data_ptr<float>(), half,
              cos.data_ptr<float>(), sin.data_ptr<float>());
  return {cos, sin};
}

torch::Tensor token_logprobs(torch::Tensor logits, torch::Tensor targets) {
  TORCH_CHECK(logits.dim() == 2 && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "token_logprobs: logits [M, V] and targets [M] expected");
  auto x = logits.contiguous();
  auto t = targets.to(torch::kInt64).contiguous();
  const int64_t m = x.size(0), v = x.size(1);
  const int64_t* tp = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < v, "token_logprobs: targets must be in [0, ", v, ")");
  auto out = torch::empty({m}, torch::kFloat32);
  if (x.scalar_type() == torch::kBFloat16) {
    logprob_rows(x.data_ptr<at::BFloat16>(), t.data_ptr<int64_t>(), out.data_ptr<float>(), m, v);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "token_logprobs: fp32 or bf16 only");
    logprob_rows(x.data_ptr<float>(), t.data_ptr<int64_t>(), out.data_ptr<float>(), m, v);
  }
  return out;
}
