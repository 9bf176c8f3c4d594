// Latency-shaped CPU kernels: decode-shaped linear and attention over a paged KV pool.
//
// Every kernel here computes each output row with arithmetic that depends only on that row's
// own inputs (and, for attention, its position and the keys before it): never on how many rows
// share the call. That is what makes the sampler's numbers equal the trainer's, bit for bit.
// bf16 values are widened to fp32 in registers (a 16-bit shift), so bf16 runs at memory speed
// on CPUs without bf16 arithmetic.
//
// One file per family (simd, team, linear, attention kernels and planning, paged attention,
// element-wise ops, the dMel embedding, the decoder pass, bindings); this header is what
// every file includes.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>
