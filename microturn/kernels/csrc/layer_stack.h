// A decoder's weights, checked and arranged once, kept by Python between passes.
#pragma once
#include "common.h"

// What a source weight was when its stack was built, with everything fresh() compares kept
// here: its impl, storage, version counter are each one load away, where reading the tensor's
// storage and then its data pointer and version chained two (57 -> 41 us on cold caches).
struct SourceState {
  torch::Tensor source;            // keeps the parameter alive
  const c10::TensorImpl* impl;
  c10::Storage storage;            // its storage then (held: its address cannot be reused)
  const void* data;                // the storage's data then (an in-place resize moves it)
  int64_t offset;
  c10::VariableVersion version;    // shares the source's counter (inference tensors: none)
  uint32_t seen_version;

  explicit SourceState(const torch::Tensor& t)
      : source(t), impl(t.unsafeGetTensorImpl()), storage(t.storage()), data(storage.data()),
        offset(t.storage_offset()), version(impl->version_counter()),
        seen_version(version.enabled() ? version.current_version() : 0) {}

  bool unchanged() const {
    return impl->storage().unsafeGetStorageImpl() == storage.unsafeGetStorageImpl() &&
           impl->storage_offset() == offset && storage.data() == data &&
           (!version.enabled() || version.current_version() == seen_version);
  }
};

// The weights of a decoder, checked and arranged once (biases widened to fp32, as packed_linear
// takes them) and kept by Python between passes: a decode step then passes one object instead
// of converting ~200 tensors. weights: per layer [input norm, qkv panels, qkv bias or empty, o
// panels, post-attention norm, gate/up panels, down panels]; then the token embedding [vocab,
// hidden], the final norm and the output head's panels. `sources` are the parameters these were
// made from: fresh() says whether each still has the storage and version it had (an optimizer
// step or a `.data` swap changes one), in C++ because a decode step asks every time and ~200
// Python attribute reads on objects the weight stream has evicted from cache cost ~0.2 ms.
// The decoder's shape and rotary frequencies: fixed for as long as its stack lives.
struct ModelShape {
  double eps;                          // RMSNorm epsilon
  int64_t hq, hkv, d, intermediate;    // query and kv heads, head size, MLP width
  bool interleaved;                    // rotary pairs (2i, 2i + 1); else (i, i + d / 2)
  torch::Tensor inv_freq;              // [d / 2] fp32
};

// One pass's place in the paged pool: the pools [layers, blocks, kv heads, ...] and the batch's
// metadata (`engine/paged_attention.py`: block table, each token's row and key count, segment
// starts, and the block and offset each new token's K/V is written to).
struct PagedPass {
  torch::Tensor k_pools, v_pools, table, rows, keys, starts, write_blocks, write_offsets;
};

struct LayerStack {
  std::vector<torch::Tensor> weights;
  std::vector<SourceState> sources;
  torch::ScalarType dtype;
  int64_t layers, vocab;
  ModelShape shape;

  bool fresh() const {
    for (const SourceState& s : sources)
      if (!s.unchanged()) return false;
    return true;
  }
  const torch::Tensor& embedding() const { return weights[7 * layers]; }
  const torch::Tensor& final_norm() const { return weights[7 * layers + 1]; }
  const torch::Tensor& head() const { return weights[7 * layers + 2]; }
};
