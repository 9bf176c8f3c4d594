// Every entry point the Python module binds (one definition each, in its family's file).
#pragma once
#include "layer_stack.h"
#include "paged.h"

torch::Tensor pack_linear_weight(torch::Tensor w);
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor panels, int64_t n,
                            c10::optional<torch::Tensor> bias);
torch::Tensor packed_linear_chain(torch::Tensor x, torch::Tensor panels, int64_t n,
                                  c10::optional<torch::Tensor> acc_in);
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                              torch::Tensor table, torch::Tensor rows, torch::Tensor keys,
                              torch::Tensor starts);
void paged_write_(torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor k, torch::Tensor v,
                  torch::Tensor blocks, torch::Tensor offsets);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
void rotary_qkv_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t q_heads,
                 int64_t kv_heads, int64_t head_dim, bool interleaved);
torch::Tensor silu_mul(torch::Tensor gate_up);
std::vector<torch::Tensor> rotary_angles(torch::Tensor positions, torch::Tensor inv_freq);
torch::Tensor token_logprobs(torch::Tensor logits, torch::Tensor targets);
torch::Tensor dmel_embedding(torch::Tensor table, torch::Tensor codes, int64_t bins);
LayerStack layer_stack(std::vector<torch::Tensor> weights, std::vector<torch::Tensor> sources,
                       int64_t vocab, ModelShape shape);
torch::Tensor paged_decoder_forward(const LayerStack& stack, const PagedPass& pass,
                                    torch::Tensor token_ids, c10::optional<torch::Tensor> embeds,
                                    torch::Tensor positions,
                                    c10::optional<torch::Tensor> logits_at);
double thread_round_trip_ns(int64_t rounds, int64_t samples);
