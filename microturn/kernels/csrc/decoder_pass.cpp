// The all-layers pass through the paged pool, and the whole forward around it, in one call.
#include "elementwise.h"
#include "layer_stack.h"
#include "paged.h"
#include "phase_clock.h"

// y [m, n] = x [m, k] times a packed weight, as packed_linear computes it: bf16 pairs straight
// into the dot-product kernel, anything else widened into `wide` first (grown only then). With
// `residual` the result is added into y (see store_output).
template <typename T>
void linear_rows(const T* x, int64_t m, int64_t k, const torch::Tensor& panels, const float* bias,
                 T* y, int64_t n, std::vector<float>& wide, bool residual = false) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (dot_packed(panels)) {
      dot_rows(reinterpret_cast<const uint16_t*>(x),
               reinterpret_cast<const uint16_t*>(panels.data_ptr<T>()), bias, y, m, n, k, residual);
      return;
    }
  }
  if (static_cast<int64_t>(wide.size()) < m * k) wide.resize(m * k);
  widen(x, wide.data(), m * k);
  packed_rows(wide.data(), panels.data_ptr<T>(), bias, y, m, n, k, residual);
}

// f(t0, t1) over rows [0, n): in a team each thread takes all of them (into its own copies),
// else they are spread over the pool's threads (a prefill's hundreds of rows)
constexpr int64_t ROTARY_GRAIN = 8;
template <typename F>
void every_row(int64_t n, int64_t grain, F&& f) {
  if (seat.team) return f(int64_t{0}, n);
  at::parallel_for(0, n, grain, f);
}

// All decoder layers of one pass through the paged KV pool, in one call: the same kernels in
// the same order as the Python layer loop, rounding to the model's dtype at the same points
// (so the same bits), on buffers allocated once per pass. No torch op runs inside the loop:
// at decode sizes their dispatch, views and copies cost more than the arithmetic (~1,500 per
// step, ~2 ms). weights: per layer [input norm, qkv panels, qkv bias or empty, o panels,
// post-attention norm, gate/up panels, down panels] (first 7 x layers entries); x [N, hidden].
template <typename T>
void decoder_layers(T* x, const std::vector<torch::Tensor>& weights, int64_t layers, float eps,
                    const float* cos, const float* sin, int64_t n, int64_t hidden, int64_t hq, int64_t hkv,
                    int64_t d, int64_t intermediate, bool interleaved, T* k_pools, T* v_pools,
                    int64_t pool_layer_elems, bool panel_keys, int64_t bs, const int32_t* table,
                    int64_t table_width, const int32_t* rows, const int32_t* keys,
                    const int32_t* starts, int64_t segments, const int64_t* write_blocks,
                    const int64_t* write_offsets) {
  const int64_t q_size = hq * d, kv_size = hkv * d, width = q_size + 2 * kv_size;
  // prefill-sized bf16 passes take silu with the gate/up projection (no gate/up buffer)
  bool fused_silu = false;
  if constexpr (std::is_same_v<T, at::BFloat16>)
    fused_silu = n > TEAM_ROWS && fused_silu_applies(weights[5], intermediate);
  std::vector<T> qkv(n * width), gate_up(fused_silu ? 0 : n * 2 * intermediate);
  const float q_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const PagedRows paged = PagedRows{table, rows, keys, starts, table_width, segments, hq, hkv,
                                    bs, d, panel_keys, PANEL}
                               .with_key_width(std::is_same_v<T, at::BFloat16>);
  const AttentionPlan plan = paged.plan(k_pools, v_pools);  // every layer's
  std::vector<float> partials(plan.partial_floats);
  auto all_layers = [&] {
    std::vector<float> wide;  // each thread's: sized by the widening linears
    AttentionWorkspace attention;  // each team thread's, kept across the layers
    // The element-wise steps between two linears (norm, rotary, attention's fold, silu) run on
    // every team thread, each into its own copy: the same bits on each, and no thread waits for
    // another's (a decode step's are a few hundred values; a rank-0 step cost a barrier each)
    std::vector<T> normed(n * hidden), att(n * q_size), act(n * intermediate);
    std::vector<float> q32(n * q_size), att32(n * q_size);
    std::vector<T> own_qkv(seat.team ? n * width : 0);
    // The packed weights lie side by side in the order they are read (qkv, o, gate/up, down,
    // the next layer's qkv, ..., the head; native_layers.py), so whoever streams a matrix's
    // second half ends where the next matrix starts. The halves alternate between the threads
    // (o and down reversed): that thread takes the next first half and its prefetched stream
    // runs on instead of starting cold (decode step 0.987 at ~65 GB/s, in-process A/B).
    constexpr bool REVERSED = true, IN_ORDER = false, RESIDUAL = true, PLAIN = false;
    auto linear = [&](const T* in, int64_t k, const torch::Tensor& panels, const float* bias,
                      T* out, int64_t cols, bool residual, bool reversed) {
      seat.reversed = reversed;
      linear_rows(in, n, k, panels, bias, out, cols, wide, residual);
      seat.reversed = false;
    };
    PhaseClock clock;
    for (int64_t l = 0; l < layers; ++l) {
      const torch::Tensor* w = weights.data() + 7 * l;
      const float* bias = w[2].numel() ? w[2].data_ptr<float>() : nullptr;
      T* k_pool = k_pools + l * pool_layer_elems;
      T* v_pool = v_pools + l * pool_layer_elems;
      rms_norm_rows(x, w[0].data_ptr<T>(), normed.data(), n, hidden, eps);
      clock.lap(PHASE_NORM);
      linear(normed.data(), hidden, w[1], bias, qkv.data(), width, PLAIN, IN_ORDER);
      clock.lap(PHASE_QKV);
      // in a team every thread rotates its own copy and writes the new keys and values itself,
      // so attention starts without a barrier: the threads store identical bytes into the same
      // slots (a race only in name: whichever store lands, every later read sees those bytes)
      T* rotated = seat.team ? own_qkv.data() : qkv.data();
      if (seat.team) std::copy(qkv.data(), qkv.data() + n * width, rotated);
      // tokens [t0, t1): rotated, their K/V stored, their queries scaled to fp32
      every_row(n, ROTARY_GRAIN, [&](int64_t t0, int64_t t1) {
        T* first = rotated + t0 * width;
        rotary_rows(first, cos + t0 * (d / 2), sin + t0 * (d / 2), t1 - t0, hq + hkv, width, d,
                    interleaved);
        write_rows(k_pool, v_pool, panel_keys, first + q_size, first + q_size + kv_size,
                   write_blocks + t0, write_offsets + t0, t1 - t0, hkv, bs, d, width);
        for (int64_t t = t0; t < t1; ++t)
          scale_rows(rotated + t * width, q_scale, q32.data() + t * q_size, q_size);
      });
      clock.lap(PHASE_ROTARY);
      for (const AttentionPlan::Pass& pass : plan.passes) {
        paged_units(paged, plan, pass, q32.data(), k_pool, v_pool, partials.data(),
                    seat.team ? &attention : nullptr);
        // a few multiply-adds per partial: in a team every thread folds them all
        paged_fold(paged, plan, pass, partials.data(), att32.data(),
                   seat.team ? &attention.total : nullptr);
        if (seat.team && plan.passes.size() > 1) team_barrier();  // the next pass reuses them
      }
      every_row(n, ROTARY_GRAIN, [&](int64_t t0, int64_t t1) {
        scale_rows(att32.data() + t0 * q_size, 1.0f, att.data() + t0 * q_size, (t1 - t0) * q_size);
      });
      clock.lap(PHASE_ATTENTION);
      linear(att.data(), q_size, w[3], nullptr, x, hidden, RESIDUAL, REVERSED);
      clock.lap(PHASE_O);
      rms_norm_rows(x, w[4].data_ptr<T>(), normed.data(), n, hidden, eps);
      clock.lap(PHASE_NORM);
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (fused_silu) {
          dot_rows_silu(reinterpret_cast<const uint16_t*>(normed.data()),
                        reinterpret_cast<const uint16_t*>(w[5].data_ptr<T>()), act.data(), n,
                        intermediate, hidden);
          clock.lap(PHASE_GATE_UP);
        }
      }
      if (!fused_silu) {
        linear(normed.data(), hidden, w[5], nullptr, gate_up.data(), 2 * intermediate, PLAIN,
               IN_ORDER);
        clock.lap(PHASE_GATE_UP);
        silu_mul_rows(gate_up.data(), act.data(), n, intermediate);
        clock.lap(PHASE_SILU);
      }
      linear(act.data(), intermediate, w[6], nullptr, x, hidden, RESIDUAL, REVERSED);
      clock.lap(PHASE_DOWN);
    }
  };
  // Decode-sized passes run as one team: their element-wise steps are a few hundred values
  // (every thread computes them) and their parallel ops then cost a barrier each
  // instead of opening and joining a region. Larger passes keep a region per op.
  const bool team = n <= TEAM_ROWS && segments * hkv <= FOLD_GRAIN;  // folds on every thread
  as_team(team ? at::get_num_threads() : 1, all_layers);
}

LayerStack layer_stack(std::vector<torch::Tensor> weights, std::vector<torch::Tensor> sources,
                       int64_t vocab, ModelShape shape) {
  TORCH_CHECK(shape.inv_freq.scalar_type() == torch::kFloat32 && shape.inv_freq.dim() == 1 &&
              shape.inv_freq.is_contiguous() && shape.inv_freq.numel() == shape.d / 2,
              "layer_stack: inv_freq [head_dim / 2] fp32 expected");
  TORCH_CHECK(weights.size() >= 10 && (weights.size() - 3) % 7 == 0,
              "layer_stack: 7 tensors per layer, then embedding, final norm and head panels");
  const int64_t layers = static_cast<int64_t>(weights.size() - 3) / 7;
  const auto dtype = weights[0].scalar_type();
  TORCH_CHECK(dtype == torch::kBFloat16 || dtype == torch::kFloat32, "layer_stack: fp32 or bf16 only");
  for (int64_t i = 0; i < static_cast<int64_t>(weights.size()); ++i) {
    if (i < 7 * layers && i % 7 == 2) {  // qkv bias
      if (weights[i].numel()) weights[i] = weights[i].to(torch::kFloat32).contiguous();
      continue;
    }
    TORCH_CHECK(weights[i].scalar_type() == dtype && weights[i].is_contiguous(),
                "layer_stack: weights must be contiguous and of one dtype");
  }
  TORCH_CHECK(weights[7 * layers].dim() == 2 && weights[7 * layers].size(0) == vocab,
              "layer_stack: embedding [vocab, hidden] expected");
  return {std::move(weights), std::vector<SourceState>(sources.begin(), sources.end()), dtype,
          layers, vocab, std::move(shape)};
}

// A contiguous int64 view of t: t itself when it is one already (no op dispatched)
torch::Tensor as_int64(const torch::Tensor& t) {
  if (t.scalar_type() == torch::kInt64 && t.is_contiguous()) return t;
  return t.to(torch::kInt64).contiguous();
}

// Every layer over x [N, hidden] (contiguous, the weights' dtype), in place.
void paged_decoder_layers_(torch::Tensor& x, const LayerStack& stack, const float* cos,
                           const float* sin, const PagedPass& pass) {
  const ModelShape& shape = stack.shape;
  const double eps = shape.eps;
  const int64_t hq = shape.hq, hkv = shape.hkv, d = shape.d, intermediate = shape.intermediate;
  const bool interleaved = shape.interleaved;
  const torch::Tensor &k_pools = pass.k_pools, &v_pools = pass.v_pools, &table = pass.table,
                      &rows = pass.rows, &keys = pass.keys, &starts = pass.starts,
                      &write_blocks = pass.write_blocks, &write_offsets = pass.write_offsets;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == stack.dtype && x.is_contiguous(),
              "paged_decoder_layers: x [N, hidden] of the weights' dtype");
  const int64_t layers = stack.layers, n = x.size(0);
  const bool panel_keys = k_pools.dim() == 6;
  TORCH_CHECK(k_pools.is_contiguous() && v_pools.is_contiguous() && v_pools.dim() == 5 &&
              k_pools.size(0) == layers && k_pools.numel() == v_pools.numel(),
              "paged_decoder_layers: pools [layers, blocks, kv heads, ...] expected");
  for (const auto& t : {table, rows, keys, starts})
    TORCH_CHECK(t.scalar_type() == torch::kInt32 && t.is_contiguous(),
                "paged_decoder_layers: contiguous int32 metadata expected");
  TORCH_CHECK(write_blocks.numel() == n && write_offsets.numel() == n,
              "paged_decoder_layers: one write slot per token");
  if (panel_keys)
    check_key_panels(k_pools, v_pools.size(3), x.scalar_type() == torch::kBFloat16, d,
                     "paged_decoder_layers");
  auto blocks = as_int64(write_blocks);
  auto offsets = as_int64(write_offsets);
  const int64_t pool_layer_elems = v_pools.numel() / layers;
  auto run = [&](auto* xp, auto* kp, auto* vp) {
    decoder_layers(xp, stack.weights, layers, static_cast<float>(eps), cos, sin, n, x.size(1), hq,
                   hkv, d, intermediate, interleaved, kp, vp, pool_layer_elems, panel_keys,
                   v_pools.size(3), table.data_ptr<int32_t>(), table.size(1),
                   rows.data_ptr<int32_t>(), keys.data_ptr<int32_t>(), starts.data_ptr<int32_t>(),
                   starts.numel() - 1, blocks.data_ptr<int64_t>(), offsets.data_ptr<int64_t>());
  };
  TORCH_CHECK(k_pools.scalar_type() == x.scalar_type(), "paged_decoder_layers: pool dtype mismatch");
  if (x.scalar_type() == torch::kBFloat16) {
    run(x.data_ptr<at::BFloat16>(), k_pools.data_ptr<at::BFloat16>(), v_pools.data_ptr<at::BFloat16>());
  } else {
    run(x.data_ptr<float>(), k_pools.data_ptr<float>(), v_pools.data_ptr<float>());
  }
}

// A whole forward pass through the paged pool in one call: token embedding (or the given
// embeddings), rotary angles, every layer, the final norm and the output head for the rows in
// logits_at only: logits [1, M, vocab]. The same kernels the Python modules call, in the same
// order: the same bits. What it removes is ~10 Python-dispatched ops around the layers, which
// after a pass over 270 MB of weights run with cold caches (~0.3 ms a decode step).
torch::Tensor paged_decoder_forward(const LayerStack& stack, const PagedPass& pass,
                                    torch::Tensor token_ids, c10::optional<torch::Tensor> embeds,
                                    torch::Tensor positions,
                                    c10::optional<torch::Tensor> logits_at) {
  const double eps = stack.shape.eps;
  const int64_t d = stack.shape.d;
  const torch::Tensor& inv_freq = stack.shape.inv_freq;
  // After a pass over the weights every ATen op meets cold caches (~10 µs each): the pass reads
  // its small inputs through pointers and allocates only its hidden rows and its logits.
  PhaseClock clock;
  const auto& embedding = stack.embedding();
  const int64_t hidden = embedding.size(1);
  const auto ids = as_int64(token_ids);
  const int64_t n = ids.numel();
  TORCH_CHECK(positions.numel() == n, "paged_decoder_forward: one position per token");
  torch::Tensor x;
  if (embeds.has_value()) {
    TORCH_CHECK(embeds->numel() == n * hidden && embeds->scalar_type() == stack.dtype,
                "paged_decoder_forward: embeds [N, hidden] of the weights' dtype expected");
    x = embeds->reshape({n, hidden}).clone(at::MemoryFormat::Contiguous);
  } else {
    const int64_t* ip = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(ip[i] >= 0 && ip[i] < stack.vocab, "paged_decoder_forward: token id ", ip[i],
                  " outside [0, ", stack.vocab, ")");
    x = torch::empty({n, hidden}, embedding.options());
    const int64_t row_bytes = hidden * static_cast<int64_t>(embedding.element_size());
    const char* table = static_cast<const char*>(embedding.data_ptr());
    char* xp = static_cast<char*>(x.data_ptr());
    for (int64_t i = 0; i < n; ++i) std::memcpy(xp + i * row_bytes, table + ip[i] * row_bytes, row_bytes);
  }
  const int64_t half = d / 2;
  std::vector<float> cos(n * half), sin(n * half);
  if (positions.scalar_type() == torch::kInt64 && positions.is_contiguous()) {  // as .to(fp32)
    const int64_t* pp = positions.data_ptr<int64_t>();
    angles_into(n, [&](int64_t t) { return static_cast<float>(pp[t]); }, inv_freq.data_ptr<float>(),
                half, cos.data(), sin.data());
  } else {
    const auto pos = positions.to(torch::kFloat32).contiguous();
    const float* pp = pos.data_ptr<float>();
    angles_into(n, [&](int64_t t) { return pp[t]; }, inv_freq.data_ptr<float>(), half, cos.data(),
                sin.data());
  }
  clock.lap(PHASE_EMBED);
  paged_decoder_layers_(x, stack, cos.data(), sin.data(), pass);
  clock = PhaseClock{};  // the layers kept their own time
  std::vector<int64_t> picked;  // the rows whose logits are asked for, Python's negative indices too
  if (logits_at.has_value()) {
    const auto at = as_int64(*logits_at);
    const int64_t* ap = at.data_ptr<int64_t>();
    for (int64_t i = 0; i < at.numel(); ++i) {
      const int64_t r = ap[i] < 0 ? ap[i] + n : ap[i];
      TORCH_CHECK(r >= 0 && r < n, "paged_decoder_forward: logits_at outside the pass's ", n,
                  " tokens");
      picked.push_back(r);
    }
  } else {
    for (int64_t r = 0; r < n; ++r) picked.push_back(r);
  }
  const int64_t m = static_cast<int64_t>(picked.size());
  auto logits = torch::empty({1, m, stack.vocab}, x.options());  // the batch dim of [1, M, vocab]
  auto head = [&](auto* xp) {
    using T = std::remove_pointer_t<decltype(xp)>;
    std::vector<T> normed(m * hidden);
    std::vector<float> wide;
    const T* w = stack.final_norm().data_ptr<T>();
    for (int64_t i = 0; i < m; ++i)
      rms_norm_rows(xp + picked[i] * hidden, w, normed.data() + i * hidden, 1, hidden,
                    static_cast<float>(eps));
    linear_rows(normed.data(), m, hidden, stack.head(), nullptr, logits.data_ptr<T>(), stack.vocab,
                wide);
  };
  if (x.scalar_type() == torch::kBFloat16) {
    head(x.data_ptr<at::BFloat16>());
  } else {
    head(x.data_ptr<float>());
  }
  clock.lap(PHASE_HEAD);
  return logits;
}

// The long calls release the GIL, so a server's event loop keeps running during a tick.
