// The Python module: every entry point, with the long calls releasing the GIL.
#include "api.h"
#include "phase_clock.h"

// The long calls release the GIL, so a server's event loop keeps running during a tick.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("pack_linear_weight", &pack_linear_weight, "pack a linear weight for packed_linear");
  m.def("cpu_has_bf16_dot", &cpu_has_bf16_dot, "bf16 linears use the CPU's bf16 dot product");
  m.def("key_panel_slots", &key_panel_slots,
        "slots per key panel of a pool with blocks of the given size (KVPool's key layout)");
  m.def("dot_attention", &dot_attention,
        "bf16 attention of this head size takes the bf16 dot-product kernel (its key layout)");
  m.def("wide_attention", [](bool on) { return g_wide_attention.exchange(on) && cpu_has_avx512(); },
        "decode attention in 16-lane vectors where the CPU has them (same bits); returns the old");
  m.def("packed_linear", &packed_linear, nogil, "batch-invariant linear over packed panels (AVX2/FMA)");
  m.def("packed_linear_chain", &packed_linear_chain, nogil,
        "a K-slice of a packed linear continuing fp32 accumulators (no bias, no rounding)");
  py::class_<LayerStack>(m, "LayerStack", py::module_local())  // builds may coexist (A/B runs)
      .def("fresh", &LayerStack::fresh, "every source weight still has its storage and version");
  py::class_<ModelShape>(m, "ModelShape", py::module_local())
      .def(py::init<double, int64_t, int64_t, int64_t, int64_t, bool, torch::Tensor>(),
           py::arg("eps"), py::arg("hq"), py::arg("hkv"), py::arg("d"), py::arg("intermediate"),
           py::arg("interleaved"), py::arg("inv_freq"));
  py::class_<PagedPass>(m, "PagedPass", py::module_local())
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor,
                    torch::Tensor, torch::Tensor, torch::Tensor>(),
           py::arg("k_pools"), py::arg("v_pools"), py::arg("table"), py::arg("rows"),
           py::arg("keys"), py::arg("starts"), py::arg("write_blocks"),
           py::arg("write_offsets"));
  m.def("layer_stack", &layer_stack, "a decoder's weights, checked and arranged once");
  m.def("paged_decoder_forward", &paged_decoder_forward, nogil, "a whole paged forward pass, one call");
  m.def("paged_write_", &paged_write_, "store new K/V rows into the block pool, in place");
  m.def("paged_attention", &paged_attention, nogil, "ragged attention through block tables");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension, fp32 arithmetic");
  m.def("rotary_qkv_", &rotary_qkv_, "in-place rotary on the q and k heads of a fused qkv");
  m.def("rotary_angles", &rotary_angles, "cos/sin of rotary angles, per element in double");
  m.def("token_logprobs", &token_logprobs, "log-probability of one target per row of logits");
  m.def("dmel_embedding", &dmel_embedding,
        "dMel frames -> the sums of their channels' table rows (DMelEmbedding's tree, fp32)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection");
  m.def("thread_round_trip_ns", &thread_round_trip_ns, nogil, py::arg("rounds") = 20000,
        py::arg("samples") = 5,
        "ns for a cache line to go from the pool's first thread to its second and back (median)");
  m.def("phase_profile", [](bool on) { return g_phase_profile.exchange(on); },
        "keep each paged pass's wall time by phase (bench engine --profile); returns the old");
  m.def("phase_seconds", [] {
    py::dict out;  // seconds per phase since the last call, which resets them
    for (int p = 0; p < PHASE_COUNT; ++p)
      out[PHASE_NAMES[p]] = static_cast<double>(g_phase_ns[p].exchange(0)) * 1e-9;
    return out;
  }, "wall seconds per phase of the paged passes since the last call (then zero)");
}
